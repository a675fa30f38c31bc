"""`penwright prepare --show N`: examples as the model will read them, the learned tokens highlighted,
then the totals, so that what training learns can be seen before it runs."""

from __future__ import annotations

import numpy as np

from .batches import Packed, too_long_note
from .config import PrepareConfig
from .tokens import TokenStore

LEARNED = "bold black on green3"  # the tokens the loss is on
CONTEXT = "grey50"  # the tokens read but not learned


def examples(store: TokenStore, count: int, tokenizer=None) -> list:
    """The first `count` training examples as rich Texts: each run of learned tokens styled LEARNED."""
    from rich.text import Text

    tokenizer = tokenizer or store.tokenizer()
    tokens, mask = store.tokens("train"), store.mask("train")
    out = []
    for start, end in _bounds(store, tokens)[:count]:
        ids = tokens[start:end].astype(np.int64)
        learned = np.ones(len(ids), bool) if mask is None else mask[start:end] == 1
        text = Text()
        edges = np.flatnonzero(np.diff(learned.astype(np.int8))) + 1  # runs of equal learned-ness
        for run in np.split(np.arange(len(ids)), edges):
            if len(run):
                piece = tokenizer.decode(ids[run].tolist(), skip_special_tokens=False)
                text.append(piece, style=LEARNED if learned[run[0]] else CONTEXT)
        out.append(text)
    return out


def _bounds(store: TokenStore, tokens: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each training example: a conversation, or a document with the EOS that ends it."""
    starts = store.starts("train")
    if starts is not None:
        return list(zip(starts[:-1].tolist(), starts[1:].tolist()))
    ends = np.flatnonzero(tokens == store.manifest["eos_token_id"])  # the stream starts with EOS
    return list(zip((ends[:-1] + 1).tolist(), (ends[1:] + 1).tolist()))


def totals(store: TokenStore, cfg: PrepareConfig, block_size: int | None = None) -> list[tuple[str, str]]:
    """(name, value) rows: examples, turns, tokens, learned tokens and their share, conversations too long."""
    stats, mask = store.stats, store.mask("train")
    train = store.manifest["train_tokens"]
    learned = train - 1 if mask is None else int(mask[1:].sum())  # the first token of each is never a target
    kind = "conversations" if store.conversations else "documents"
    rows = [(kind, f"{stats['documents']:,} ({stats['train_documents']:,} train / {stats['val_documents']:,} "
                   "validation)")]
    if store.conversations:
        rows.append(("turns", f"{stats['turns']:,}"))
    rows.append(("tokens", f"{stats['tokens']:,} ({train:,} train)"))
    share = f"{learned:,} of the training split's {train:,} ({learned / max(1, train):.1%})"
    rows.append(("learned tokens", share + (f", learning {stats['train_on']}" if store.conversations else "")))
    if store.conversations and block_size:
        packed = Packed(store.tokens("train"), mask, store.starts("train"), block_size, 1, 0,
                        truncate=cfg.truncate)
        rows.append(("too long",
                     too_long_note(packed.too_long, block_size, cfg.truncate) if packed.too_long else "none"))
        rows.append(("blocks", f"{packed.windows:,} of {block_size} tokens, {packed.filled:.0%} filled"))
    if stats.get("skipped_rows"):
        rows.append(("skipped rows", f"{stats['skipped_rows']:,} malformed (--max-bad-rows)"))
    if stats.get("unrendered_replies"):
        rows.append(("not learned", f"{stats['unrendered_replies']:,} replies the chat template does not "
                                    "write out as they are"))
    return rows
