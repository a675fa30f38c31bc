"""Tokenizing into the cached TokenStore: layout, control tokens, masks, cache hits."""

import numpy as np
import pytest

from penwright import tokens
from penwright.config import PrepareConfig
from penwright.tokens import prepare


def config(data, **options):
    return PrepareConfig(data=str(data), init="scratch", vocab_size=400, **options)


def test_second_prepare_hits_the_cache_and_tokenizes_nothing(stories_txt, monkeypatch):
    first = prepare(config(stories_txt), log=lambda *_: None)
    monkeypatch.setattr(tokens, "encode_documents", lambda *a, **k: pytest.fail("tokenized again"))
    monkeypatch.setattr(tokens, "train_tokenizer", lambda *a, **k: pytest.fail("trained a tokenizer again"))
    messages = []
    second = prepare(config(stories_txt), log=messages.append)
    assert second.path == first.path and "cache" in messages[0]
    assert np.array_equal(first.tokens("train"), second.tokens("train"))


def test_changed_corpus_or_options_miss_the_cache(tmp_path, stories_txt):
    copy = tmp_path / "stories.txt"
    copy.write_text(stories_txt.read_text() + "\nOne more line.\n")
    base = prepare(config(stories_txt), log=lambda *_: None)
    assert prepare(config(copy), log=lambda *_: None).path != base.path
    assert prepare(config(stories_txt, line_by_line=True), log=lambda *_: None).path != base.path


def test_store_layout_uint16_and_documents_separated_by_eos(stories_csv):
    store = prepare(config(stories_csv, text_column="synopsis", val_fraction=0.1), log=lambda *_: None)
    train, eos = store.tokens("train"), store.manifest["eos_token_id"]
    assert train.dtype == np.uint16 and store.mask("train") is None
    assert train[0] == eos and train[-1] == eos
    assert int((train == eos).sum()) == store.stats["train_documents"] + 1
    assert store.stats["train_tokens"] + store.stats["val_tokens"] == store.stats["tokens"]
    assert store.tokenizer().decode(train[1:40].tolist()).startswith(store.tokenizer().decode(train[1:5].tolist()))


def test_label_control_tokens_round_trip(stories_csv):
    store = prepare(config(stories_csv, text_column="synopsis", label_column="genre"), log=lambda *_: None)
    tokenizer = store.tokenizer()
    horror = tokenizer.convert_tokens_to_ids("<|genre=horror|>")
    assert tokenizer.encode("<|genre=horror|> It", add_special_tokens=False)[0] == horror
    train = store.tokens("train")
    eos = store.manifest["eos_token_id"]
    starts = np.flatnonzero(train[:-1] == eos) + 1
    labels = {tokenizer.convert_ids_to_tokens(int(train[i])) for i in starts if i < len(train)}
    assert labels == {f"<|genre={g}|>" for g in ("horror", "romance", "scifi", "fantasy", "mystery", "comedy")}
    assert tokenizer.decode([horror, *train[starts[0] + 1:starts[0] + 4].tolist()], skip_special_tokens=True)[0] != "<"


def test_prompt_completion_mask_covers_only_completions(stories_jsonl):
    store = prepare(config(stories_jsonl, prompt_column="prompt", completion_column="completion", label_column="genre",
                           val_fraction=0), log=lambda *_: None)
    train, mask, tok = store.tokens("train"), store.mask("train"), store.tokenizer()
    assert mask is not None and len(mask) == len(train)
    learned = tok.decode(train[mask == 1].tolist())
    ignored = tok.decode(train[mask == 0].tolist(), skip_special_tokens=True)
    assert "Title:" not in learned and "Story:" not in learned
    assert "Title:" in ignored and "<|genre=" not in tok.decode(train[mask == 1].tolist(), skip_special_tokens=False)


def test_long_texts_are_chunked_without_changing_tokens(stories_txt, monkeypatch):
    store = prepare(config(stories_txt, val_fraction=0), log=lambda *_: None)
    tokenizer, text = store.tokenizer(), stories_txt.read_text()
    whole = tokens.encode_texts(tokenizer, [text])[0]
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 500)
    assert len(list(tokens._chunks(text))) > 50
    assert np.array_equal(tokens.encode_texts(tokenizer, [text])[0], whole)


def test_a_killed_prepare_leaves_nothing_the_next_one_keeps(tmp_path, stories_txt):
    """Temporary stores of dead processes older than a minute go; a live writer's, or a fresh one, stay."""
    import os
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    root = tokens.cache_root(config(stories_txt, cache_dir=str(tmp_path)))
    old, young, live = (root / f".tmp-{name}" for name in (f"abc-{dead}", f"def-{dead}", f"ghi-{os.getpid()}"))
    for folder in (old, young, live):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    for folder in (old, live):
        os.utime(folder, (an_hour_ago, an_hour_ago))
    store = prepare(config(stories_txt, cache_dir=str(tmp_path)), log=lambda *_: None)
    assert not old.exists() and young.exists() and live.exists()
    assert store.path.parent == root and [p for p in root.iterdir() if not p.name.startswith(".")] == [store.path]
