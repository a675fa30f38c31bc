"""What the model reads: non-overlapping blocks of the token stream, and the validation loss over them.

Micro-batch `i` is a pure function of (seed, i), so the data position of a checkpoint is its
step, and a resumed run, or one on another number of processes, sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .devices import autocast
from .errors import PenwrightError
from .losses import IGNORE, lm_loss
from .tokens import TokenStore


class Blocks:
    """Non-overlapping `block_size` windows of a token stream, shuffled per epoch.

    Micro-batch `i` is a pure function of (seed, i): epoch `i // per_epoch` uses its own
    permutation of the windows. Rank `r` of `world` takes its slice of each global batch.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray | None, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world: int = 1):
        self.tokens, self.mask, self.block = tokens, mask, block_size
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.windows = (len(tokens) - 1) // block_size
        self.per_epoch = self.windows // (batch_size * world)
        self._order = (None, None)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        first = (j * self.world + self.rank) * self.batch
        return self.rows(self._order[1][first:first + self.batch])

    def rows(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(windows, dtype=np.int64)[:, None] * self.block
        index = starts + np.arange(self.block + 1)
        chunk = torch.from_numpy(self.tokens[index].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[index[:, 1:]] == 0)] = IGNORE
        return x, y


def training_blocks(store: TokenStore, cfg: TrainConfig, rank: int = 0, world: int = 1) -> Blocks:
    tokens = store.tokens("train")
    blocks = Blocks(tokens, store.mask("train"), cfg.block_size, cfg.batch_size, cfg.seed, rank, world)
    if blocks.windows == 0:
        fits = 1 << max(3, (len(tokens) - 2).bit_length() - 1)
        hint = f"use --block-size {fits} or less, or add text" if len(tokens) > 9 else "add more text"
        raise PenwrightError(f"the training split has {len(tokens)} tokens, fewer than one block of "
                             f"{cfg.block_size}+1; {hint}")
    if blocks.per_epoch == 0:
        raise PenwrightError(f"the training split holds {blocks.windows} blocks of {cfg.block_size} tokens, fewer "
                             f"than one batch of {cfg.batch_size * world}; use --batch-size {blocks.windows // world} "
                             "or a smaller --block-size")
    return blocks


@dataclass
class Evaluator:
    blocks: Blocks | None
    dtype: torch.dtype

    @classmethod
    def over(cls, store: TokenStore, block_size: int, dtype) -> "Evaluator":
        tokens = store.tokens("val")
        if len(tokens) < 2:
            return cls(None, dtype)
        block = min(block_size, len(tokens) - 1)
        return cls(Blocks(tokens, store.mask("val"), block, 1, 0), dtype)

    def batches(self, max_batches: int | None = None, batch_size: int = 8) -> int:
        """How many batches `loss` reads."""
        windows = self.blocks.windows if self.blocks else 0
        return min(-(-windows // batch_size), max_batches or windows)

    @torch.no_grad()
    def loss(self, model, max_batches: int | None = None, batch_size: int = 8) -> float:
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
            x, y = self.blocks.rows(windows[start:start + batch_size])
            with autocast(device, self.dtype):
                total += lm_loss(model, x.to(device), y.to(device), reduction="sum").double().cpu()
            count += int((y != IGNORE).sum())
        model.train(was_training)
        return total.item() / max(count, 1)
