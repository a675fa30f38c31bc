"""What the model reads: blocks of the token stream, and the validation loss over them.

Plain text is cut into non-overlapping windows of one stream (`Blocks`). Conversations are packed
whole into blocks (`Packed`), each restarting its positions, from which transformers builds a
block-diagonal causal mask: no conversation sees another. Micro-batch `i` is a pure function of
(seed, i), so the data position of a checkpoint is its step, and a resumed run, or one on another
number of processes, sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .devices import autocast
from .errors import PenwrightError
from .losses import IGNORE, lm_loss
from .tokens import TokenStore
from .words import plural


class Blocks:
    """Non-overlapping `block_size` windows of a token stream, plus one from each of `starts`
    (offsets off that grid), shuffled per epoch.

    Micro-batch `i` is a pure function of (seed, i): epoch `i // per_epoch` uses its own
    permutation of the windows. Rank `r` of `world` takes its slice of each global batch.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray | None, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world: int = 1, starts: np.ndarray | None = None):
        self.tokens, self.mask, self.block = tokens, mask, block_size
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.offsets = np.arange((len(tokens) - 1) // block_size, dtype=np.int64) * block_size
        if starts is not None:
            self.offsets = np.concatenate([self.offsets, np.asarray(starts, dtype=np.int64)])
        self.windows = len(self.offsets)
        self._order = (None, None)

    @property
    def per_epoch(self) -> int:
        return self.windows // (self.batch * self.world)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        epoch, j = divmod(i, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        first = (j * self.world + self.rank) * self.batch
        return self.rows(self._order[1][first:first + self.batch])

    def rows(self, windows) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Inputs, targets (IGNORE where nothing is learned) and positions (None: 0, 1, ... in every row)."""
        index = self.offsets[np.asarray(windows, dtype=np.int64)][:, None] + np.arange(self.block + 1)
        chunk = torch.from_numpy(self.tokens[index].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[index[:, 1:]] == 0)] = IGNORE
        return x, y, None


class Packed(Blocks):
    """Whole conversations packed into blocks of `block_size` tokens, never split, shuffled per epoch.

    The packing is fixed (best-fit by decreasing length, so little is padding); the order of the
    blocks is what the seed shuffles. A conversation longer than a block is left out, or with
    `truncate` cut to the block. Each row's positions restart at every conversation (and at its
    padding), which is how the model is told where one ends.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, block_size: int,
                 batch_size: int, seed: int, rank: int = 0, world: int = 1, truncate: bool = False, pad: int = 0):
        self.tokens, self.mask, self.block, self.pad = tokens, mask, block_size, pad
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.starts = starts[:-1]
        lengths = np.diff(starts)
        long = lengths > block_size
        self.too_long = int(long.sum())  # dropped, or with truncate cut
        self.truncated = truncate
        self.lengths = np.minimum(lengths, block_size)
        kept = np.flatnonzero(~long | truncate)
        self.packs = pack(self.lengths[kept], block_size, kept)
        self.windows = len(self.packs)
        learned = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # targets are tokens 1.. of each one
        first, end = self.starts[kept], self.starts[kept] + self.lengths[kept]
        self.learned = int((learned[end] - learned[first + 1]).sum())
        self.filled = float(self.lengths[kept].sum() / max(1, self.windows * block_size))
        self._order = (None, None)

    def rows(self, windows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(windows)
        x = np.full((n, self.block), self.pad, np.int64)
        y = np.full((n, self.block), IGNORE, np.int64)
        positions = np.zeros((n, self.block), np.int64)
        for row, window in enumerate(windows):
            at = 0
            for c in self.packs[window]:
                start, size = self.starts[c], self.lengths[c]
                ids = self.tokens[start:start + size].astype(np.int64)
                x[row, at:at + size] = ids
                y[row, at:at + size - 1] = np.where(self.mask[start + 1:start + size] == 1, ids[1:], IGNORE)
                positions[row, at:at + size] = np.arange(size)
                at += size
            positions[row, at:] = np.arange(self.block - at)  # the padding: a sequence of its own
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(positions)


def pack(lengths: np.ndarray, capacity: int, ids: np.ndarray) -> list[list[int]]:
    """Best-fit decreasing: the longest first, each into the fullest block it fits in, else a new block."""
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block), sorted
    for i in np.argsort(-lengths, kind="stable"):
        size = int(lengths[i])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            blocks.append([])
            room, block = capacity, len(blocks) - 1
        else:
            room, block = free.pop(at)
        blocks[block].append(int(ids[i]))
        if room > size:
            bisect.insort(free, (room - size, block))
    return blocks


def training_blocks(store: TokenStore, cfg: TrainConfig, rank: int = 0, world: int = 1, log=print) -> Blocks:
    if store.conversations:
        return _packed(store, cfg, rank, world, log)
    tokens = store.tokens("train")
    blocks = Blocks(tokens, store.mask("train"), cfg.block_size, cfg.batch_size, cfg.seed, rank, world,
                    starts=store.document_starts("train", cfg.block_size))
    if blocks.windows == 0:
        fits = 1 << max(3, (len(tokens) - 2).bit_length() - 1)
        hint = f"use --block-size {fits} or less, or add text" if len(tokens) > 9 else "add more text"
        raise PenwrightError(f"the training split has {plural(len(tokens), 'token')}, fewer than one block of "
                             f"{cfg.block_size}+1; {hint}")
    return _enough(blocks, cfg, world)


def _enough(blocks: Blocks, cfg: TrainConfig, world: int) -> Blocks:
    if blocks.per_epoch == 0:
        raise PenwrightError(f"the training split holds {plural(blocks.windows, 'block')} of {cfg.block_size} "
                             f"tokens, fewer than one batch of {cfg.batch_size * world}; use --batch-size "
                             f"{max(1, blocks.windows // world)} or a smaller --block-size")
    return blocks


def _packed(store: TokenStore, cfg: TrainConfig, rank: int, world: int, log) -> Packed:
    blocks = Packed(store.tokens("train"), store.mask("train"), store.starts("train"), cfg.block_size,
                    cfg.batch_size, cfg.seed, rank, world, cfg.truncate, store.manifest["eos_token_id"])
    kept = len(blocks.starts) - (0 if cfg.truncate else blocks.too_long)
    note = f"; {too_long_note(blocks.too_long, cfg.block_size, cfg.truncate)}" if blocks.too_long else ""
    log(f"packed {kept:,} conversations whole into {blocks.windows:,} blocks of {cfg.block_size} tokens "
        f"({blocks.filled:.0%} filled){note}")
    if blocks.learned == 0:
        why = (f"every conversation is longer than the block of {cfg.block_size} tokens; use --truncate or a "
               "larger --block-size" if kept == 0 else
               f"the first {cfg.block_size} tokens of the conversations hold no reply; use a larger "
               "--block-size")
        raise PenwrightError(f"no token would be learned: {why}")
    return _enough(blocks, cfg, world)


def too_long_note(count: int, block_size: int, truncate: bool) -> str:
    if truncate:
        return f"{count:,} longer than {block_size} tokens cut to fit (--truncate)"
    return (f"{count:,} longer than {block_size} tokens left out (--truncate keeps their first "
            f"{block_size}, a larger --block-size keeps them whole)")


@dataclass
class Evaluator:
    blocks: Blocks | None
    dtype: torch.dtype

    @classmethod
    def over(cls, store: TokenStore, block_size: int, dtype, truncate: bool = False) -> "Evaluator":
        tokens = store.tokens("val")
        if len(tokens) < 2:
            return cls(None, dtype)
        if store.conversations:  # packed as in training
            packed = Packed(tokens, store.mask("val"), store.starts("val"), block_size, 1, 0,
                            truncate=truncate, pad=store.manifest["eos_token_id"])
            return cls(packed if packed.windows else None, dtype)
        block = min(block_size, len(tokens) - 1)
        return cls(Blocks(tokens, store.mask("val"), block, 1, 0), dtype)

    batch_size = 8  # windows per evaluation batch

    @property
    def block(self) -> int:
        return self.blocks.block if self.blocks else 0

    def batches(self, max_batches: int | None = None, batch_size: int = batch_size) -> int:
        """How many batches `loss` reads."""
        windows = self.blocks.windows if self.blocks else 0
        return min(-(-windows // batch_size), max_batches or windows)

    @torch.no_grad()
    def loss(self, model, max_batches: int | None = None, batch_size: int = batch_size) -> float:
        """Token-weighted mean loss over the first `max_batches` batches of validation windows."""
        if self.blocks is None:
            return float("nan")
        device = next(model.parameters()).device
        windows = list(range(self.blocks.windows))
        if max_batches is not None:
            windows = windows[:max_batches * batch_size]
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, len(windows), batch_size):
            x, y, positions = self.blocks.rows(windows[start:start + batch_size])
            positions = None if positions is None else positions.to(device)
            with autocast(device, self.dtype):
                loss = lm_loss(model, x.to(device), y.to(device), reduction="sum", positions=positions)
            total += loss.double().cpu()
            count += int((y != IGNORE).sum())
        model.train(was_training)
        return total.item() / max(count, 1)
