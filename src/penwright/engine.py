"""penwright's own engine for writing: no training, no dropout, no transformers.

A family module (gpt2.py, llama.py) defines its blocks, reads its config.json and names its
weights. This module holds what the families share:

- loading: an HF folder's safetensors (one file or shards) into modules that skip random
  initialisation, then int8 weights (quantize.py) and the compute dtype;
- `Model`: embeddings, blocks, final norm; the head runs only where logits are wanted;
- `attend`: attention of a step's queries over their rows' keys so far, written into the cache;
- `Cache`: a pool of row slots for keys and values, allocated once, each row with its own length,
  and the primitives a scheduler calls: `reserve`, `prefill` (in chunks), `decode` (one token for
  a set of rows at different lengths at once), `feed` (several slots' new tokens, prompt chunks
  and next tokens alike, packed into one pass), `fork`, `free`;
- `Stepper`: a batch of writing for `generate.Writer`, on those same primitives.

`generate.load` picks this engine for the folders the families accept and transformers for the rest.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PenwrightError

WEIGHTS, SHARDS = "model.safetensors", "model.safetensors.index.json"


# --- reading an HF folder ---------------------------------------------------------------------

def folder_problem(path: Path) -> str | None:
    """Why the folder `path` cannot be read by this engine whatever its architecture, or None."""
    from .lora import is_adapter

    if not path.is_dir():
        return "it reads local model directories only, not hub ids or .gguf files"
    if is_adapter(path):
        return "it is a LoRA run, whose adapter is merged into its base model by transformers"
    try:
        read_config(path)
    except (OSError, ValueError):
        return "there is no readable config.json"
    if not ((path / WEIGHTS).is_file() or (path / SHARDS).is_file()):
        return f"there is no {WEIGHTS} or {SHARDS} (pickled weights are not read)"
    if not (path / "tokenizer.json").is_file():
        return "there is no tokenizer.json"
    return None


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, from one file or from the shards its index names."""
    from safetensors.torch import load_file

    if (path / WEIGHTS).is_file():
        return load_file(path / WEIGHTS)
    state = {}
    for shard in sorted(set(json.loads((path / SHARDS).read_text())["weight_map"].values())):
        state.update(load_file(path / shard))
    return state


# --- the model --------------------------------------------------------------------------------

class Loaded:
    """No random initialisation: every weight comes from the checkpoint. (Building on the meta
    device instead would import torch._dynamo, a second on a small CPU.)"""

    def reset_parameters(self):
        pass


class Linear(Loaded, nn.Linear):
    pass


class Embedding(Loaded, nn.Embedding):
    pass


@dataclass
class Shape:
    """What the cache and the writer need to know of a model."""

    vocab: int
    context: int  # positions it was trained for
    layers: int
    kv_heads: int
    head_dim: int


class Model(nn.Module):
    """A family's model as the engine runs it. The family sets `shape`, `layers` (blocks called as
    `block(x, step)`), `norm`, `lm_head` and `embed(ids, step)`, which may leave per-step tensors
    on the step (llama.py's rotary angles)."""

    shape: Shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position of whole rows `idx` (B, T), without a cache (perplexity, tests)."""
        return self.lm_head(self.hidden(idx, Step.whole(idx)))

    def hidden(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed(ids, step)
        for block in self.layers:
            x = block(x, step)
        return self.norm(x)


def build(path: Path, model: Model, weights: Callable[[dict], dict], dtype: torch.dtype,
          int8: bool) -> Model:
    """`model` with the folder's weights, as `weights` renames them for it; int8 and `dtype` after."""
    try:
        model.load_state_dict(weights({k: v.float() for k, v in read_weights(path).items()}), assign=True)
    except (KeyError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise PenwrightError(f"{path}: its weights do not fit its config.json ({detail})") from None
    if int8:  # quantized from the stored weights, before any rounding to bf16
        from .quantize import quantize_int8

        quantize_int8(model, dtype)
    return model.to(dtype).eval().requires_grad_(False)


# --- one forward pass -------------------------------------------------------------------------

@dataclass
class Step:
    """Where one forward pass's tokens sit, and (with a cache) where their keys go.

    `positions` (B, T) is each token's position in its row. Without a cache the rows are whole
    sequences. With one, `rows` are the cache slots fed, and attention reads the slots of `span`
    (the lowest to the highest fed slot) up to `keys` positions; `scatter` places the fed rows in
    the span when they are not all of it (the others' outputs are computed and dropped). `start`
    is the common first position when every row of the span starts at the same one.
    """

    positions: torch.Tensor
    keys: int
    cache: Cache | None = None
    rows: torch.Tensor | None = None
    span: slice = field(default_factory=lambda: slice(None))
    scatter: torch.Tensor | None = None
    start: int | None = 0
    rope: tuple | None = None  # set by families that rotate queries and keys
    segments: list[tuple[int, int, int]] | None = None  # a packed step's (slot, first position, tokens)
    writes: torch.Tensor | None = None  # and where its keys go in a layer's cache seen as rows of head_dim
    _masks: dict = field(default_factory=dict)

    @classmethod
    def whole(cls, idx: torch.Tensor) -> Step:
        positions = torch.arange(idx.size(1), device=idx.device).expand(idx.size(0), -1)
        return cls(positions, keys=idx.size(1))

    def mask(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """The boolean key mask for attention with a sliding `window` (None: unlimited), and whether
        SDPA's own causal mask does instead (a prefill from position 0). One new token per row at
        a common position sees every key so far: no mask. (SDPA's causal mask is aligned to key 0,
        so a later chunk of a prefill needs the explicit one.)"""
        if window is not None and window >= self.keys:
            window = None  # no key is that far back
        new = self.positions.size(1)
        if window is None and self.start is not None and (new == 1 or self.start == 0):
            return None, new > 1
        if window not in self._masks:
            span_positions = self.positions
            if self.scatter is not None:  # the span's rows that are not fed see everything
                span_positions = torch.full((self.span.stop - self.span.start, self.positions.size(1)),
                                            self.keys - 1, device=self.positions.device)
                span_positions[self.scatter] = self.positions
            query = span_positions[:, None, :, None]
            key = torch.arange(self.keys, device=query.device)
            allowed = key <= query
            if window is not None:
                allowed &= query - key < window
            self._masks[window] = allowed
        return self._masks[window], False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, layer: int,
           window: int | None = None) -> torch.Tensor:
    """Attention of the step's queries q (B, heads, T, head_dim) over every key of their rows so
    far (grouped-query when k and v have fewer heads), after writing this step's keys and values
    into `layer`'s cache. Returns (B, heads, T, head_dim) in q's dtype."""
    dtype = q.dtype
    if step.segments is not None:
        return packed(q, k, v, step, layer, window).to(dtype)
    if step.cache is not None:
        keys, values = step.cache.layers[layer]
        k, v = k.to(keys.dtype), v.to(keys.dtype)
        if step.start is not None:  # every row at the same position: a slice, no index
            end = step.start + q.size(2)
            keys[step.span, :, step.start:end], values[step.span, :, step.start:end] = k, v
        else:
            at = (step.rows[:, None], slice(None), step.positions)
            keys[at], values[at] = k.transpose(1, 2), v.transpose(1, 2)
        q = q.to(keys.dtype)
        if step.start is None and q.size(2) == 1 and q.device.type == "cpu":
            return each_row(q, keys, values, step, window).to(dtype)
        k, v = keys[step.span, :, :step.keys], values[step.span, :, :step.keys]
        if step.scatter is not None:
            q = q.new_zeros((k.size(0), *q.shape[1:])).index_copy_(0, step.scatter, q)
    mask, causal = step.mask(window)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       enable_gqa=k.size(1) != q.size(1))
    if step.scatter is not None:
        y = y[step.scatter]
    return y.to(dtype)


def each_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: Step, window: int | None
             ) -> torch.Tensor:
    """A decode step of rows at different lengths, row by row over exactly each row's keys: the numbers
    the row gets alone, whatever its company. (On CPU int8's kernel treats rows apart too, so a row's
    text does not depend on what else is written; masked batch attention differs in the last bits,
    which int8's bf16 inputs can turn into different samples.)"""
    out = []
    for i, (slot, position) in enumerate(zip(step.rows.tolist(), step.positions[:, 0].tolist())):
        k, v = keys[slot:slot + 1, :, :position + 1], values[slot:slot + 1, :, :position + 1]
        mask = segment_mask(position, 1, window, q.device)  # as `Step.mask` makes it for this row alone
        out.append(F.scaled_dot_product_attention(q[i:i + 1], k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1)))
    return torch.cat(out)


def packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, layer: int, window: int | None
           ) -> torch.Tensor:
    """Attention of a packed step (`Cache.feed`): one row of several slots' new tokens, each segment
    of it over its own slot's keys, causally, as it would be fed alone."""
    keys, values = step.cache.layers[layer]
    for cache, new in ((keys, k), (values, v)):  # one copy of rows (an indexed assignment is 10x slower)
        cache.view(-1, cache.size(-1)).index_copy_(0, step.writes, new[0].reshape(-1, new.size(-1)).to(cache.dtype))
    q, out, offset = q.to(keys.dtype), [], 0
    for index, (slot, start, n) in enumerate(step.segments):
        if (index, window) not in step._masks:  # the same for every layer of that window
            step._masks[index, window] = segment_mask(start, n, window, q.device)
        k, v = keys[slot:slot + 1, :, :start + n], values[slot:slot + 1, :, :start + n]
        mask = step._masks[index, window]
        out.append(F.scaled_dot_product_attention(q[:, :, offset:offset + n].contiguous(), k, v, attn_mask=mask,
                                                  enable_gqa=k.size(1) != q.size(1)))
        offset += n
    return torch.cat(out, dim=2)


def segment_mask(start: int, n: int, window: int | None, device) -> torch.Tensor | None:
    """Which keys each of `n` new tokens from position `start` sees (causal, within `window`); None
    where every token sees them all (one new token without a window that cuts)."""
    if n == 1 and (window is None or window > start):
        return None  # a decode step's usual case, on every row and layer: no tensors to build
    query, key = torch.arange(start, start + n, device=device)[:, None], torch.arange(start + n, device=device)
    allowed = (key <= query) & ((query - key < window) if window is not None else True)
    return None if bool(allowed.all()) else allowed[None, None]


# --- the cache and its primitives -------------------------------------------------------------

class Cache:
    """Keys and values for up to `slots` rows of up to `length` tokens each, allocated once.

    Each slot holds one row of text with its own length: its tokens sit at positions 0, 1, ...
    of the slot, with no padding. Keys and values stay fp32 on CPU, where bf16 attention kernels
    run several times slower than fp32's (even with native bf16), and in the model's dtype elsewhere.
    """

    def __init__(self, model: Model, slots: int, length: int):
        device = next(model.parameters()).device
        dtype = torch.float32 if device.type == "cpu" else next(model.parameters()).dtype
        s = model.shape
        shape = (slots, s.kv_heads, length, s.head_dim)
        self.model, self.length = model, length
        # Zeros, not empty memory: a row reads (masked) the positions of longer rows that it has not
        # written, and a NaN there would leak through the masked softmax (0 x NaN is NaN).
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(s.layers)]
        self.lengths = [0] * slots  # tokens held by each slot
        self.idle = list(range(slots))  # free slots, lowest first

    def reserve(self) -> int:
        """A free slot, emptied. The lowest is given first, so busy slots stay together and
        `decode` reads one short span of the pool."""
        if not self.idle:
            raise RuntimeError(f"all {len(self.lengths)} cache slots are in use")
        slot = self.idle.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        bisect.insort(self.idle, slot)

    def prefill(self, slot: int, ids: Sequence[int], chunk: int | None = None
                ) -> Iterator[torch.Tensor | None]:
        """Feed a prompt into `slot`, `chunk` tokens at a time (all at once by default), after what
        it holds. Yields once per chunk: None, then the logits of the next token (vocab,) after the
        last chunk. A scheduler advances it a chunk per step; `last(cache.prefill(...))` runs it whole."""
        if not len(ids):
            raise ValueError("prefill needs at least one token")
        device = self.layers[0][0].device
        ids = torch.as_tensor(ids, device=device).view(1, -1)
        chunk = chunk or ids.size(1)
        for start in range(0, ids.size(1), chunk):
            end = start + chunk >= ids.size(1)
            logits = self._feed([slot], ids[:, start:start + chunk], head=end)
            yield logits[0] if end else None

    def decode(self, slots: Sequence[int], ids: torch.Tensor) -> torch.Tensor:
        """Feed one token to each of `slots` (rows at any lengths); next-token logits (len(slots), vocab)."""
        return self._feed(slots, ids.view(-1, 1))

    def feed(self, segments: Sequence[tuple[int, Sequence[int]]], heads: Sequence[bool]) -> torch.Tensor:
        """One pass for several slots' new tokens at once (a slot's next token, or a chunk of its
        prompt), packed into one row; the logits (rows, vocab) after the last token of each segment
        whose `heads` entry is True. Every layer of the pass treats tokens apart but attention, which
        reads each segment's own slot: with `quantize.int8_activations` (exact integer sums) a slot gets
        exactly the numbers it would get fed alone, and the batch shares one read of the weights."""
        slots, sizes = [slot for slot, _ in segments], [len(ids) for _, ids in segments]
        starts = [self.lengths[slot] for slot in slots]
        keys = max(start + n for start, n in zip(starts, sizes))
        if keys > self.length:
            raise ValueError(f"a row would hold more than {self.length} tokens")
        device = self.layers[0][0].device
        ids = torch.tensor([token for _, chunk in segments for token in chunk], device=device)[None]
        positions = torch.cat([torch.arange(start, start + n) for start, n in zip(starts, sizes)]).to(device)[None]
        rows = torch.tensor([slot for slot, n in zip(slots, sizes) for _ in range(n)], device=device)
        kv = torch.arange(self.model.shape.kv_heads, device=device)[:, None]  # (slot, head, position) as one row
        writes = ((rows[None] * len(kv) + kv) * self.length + positions).view(-1)
        step = Step(positions, keys, self, rows, start=None, segments=list(zip(slots, starts, sizes)), writes=writes)
        x = self.model.hidden(ids, step)[0]
        for slot, n in zip(slots, sizes):
            self.lengths[slot] += n
        ends = [end - 1 for end, head in zip(itertools.accumulate(sizes), heads) if head]
        return self.model.lm_head(x[ends])

    def fork(self, source: int, target: int) -> None:
        """Copy what `source` holds into `target` (rows sampled from one prompt prefill it once)."""
        n = self.lengths[source]
        for keys, values in self.layers:
            keys[target, :, :n], values[target, :, :n] = keys[source, :, :n], values[source, :, :n]
        self.lengths[target] = n

    def _feed(self, slots: Sequence[int], ids: torch.Tensor, head: bool = True) -> torch.Tensor | None:
        step = self._step(list(slots), ids.size(1))
        x = self.model.hidden(ids, step)
        for slot in slots:
            self.lengths[slot] += ids.size(1)
        return self.model.lm_head(x[:, -1]) if head else None

    def _step(self, slots: list[int], new: int) -> Step:
        lengths = [self.lengths[s] for s in slots]
        keys = max(lengths) + new
        if keys > self.length:
            raise ValueError(f"a row would hold {keys} tokens in a cache of {self.length} per slot")
        device = self.layers[0][0].device
        lo, hi = min(slots), max(slots) + 1
        whole = slots == list(range(lo, hi))
        rows = torch.tensor(slots, device=device)
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(new, device=device)
        return Step(positions, keys, self, rows, slice(lo, hi), scatter=None if whole else rows - lo,
                    start=lengths[0] if whole and len(set(lengths)) == 1 else None)


def last(iterator: Iterator):
    """The last value an iterator yields (a whole `Cache.prefill`)."""
    return deque(iterator, maxlen=1).pop()


class Stepper:
    """One batch of writing for `generate.Writer`, on the cache's primitives: a slot per row, each
    distinct prompt prefilled once (rows with the same prompt fork its slot), then `next` decodes
    one token for every row. Rows keep their own lengths, so prompts need no padding."""

    def __init__(self, model: Model):
        self.model = model

    def first(self, prompts: list[list[int]], steps: int) -> torch.Tensor:
        """Prefill `prompts` with room for `steps` new tokens each; logits for the next token (B, vocab)."""
        self.cache = Cache(self.model, len(prompts), max(map(len, prompts)) + steps)
        self.slots = [self.cache.reserve() for _ in prompts]
        done: dict[tuple, tuple[int, torch.Tensor]] = {}  # prompt -> its slot and logits
        logits = []
        for slot, prompt in zip(self.slots, prompts):
            if tuple(prompt) in done:
                source, out = done[tuple(prompt)]
                self.cache.fork(source, slot)
            else:
                out = last(self.cache.prefill(slot, prompt))
                done[tuple(prompt)] = slot, out
            logits.append(out)
        return torch.stack(logits)

    def next(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B, 1); logits for the one after it."""
        return self.cache.decode(self.slots, ids)
