"""Shared fixtures: small corpora written by the tests, and one tiny trained run reused by many tests.

Nothing here needs the network or files outside the repository: corpora are cut from the
project's own sample data, tokenizers are trained on them, models are built from scratch.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI is repeatable;
# HYPOTHESIS_PROFILE=explore draws new ones to hunt for fresh failures.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "penwright" / "data" / "sample_stories.csv"


def sample_rows() -> list[dict]:
    with open(SAMPLE, newline="") as f:
        return list(csv.DictReader(f))


def pytest_report_header(config):
    """Say which machine the suite ran on, so a failure report says where it failed."""
    from penwright.devices import cpu_description

    return f"machine: {cpu_description()}"


@pytest.fixture(params=["fp32", "bf16"])
def cpu_path(request, monkeypatch) -> str:
    """Run a test on both CPU precision paths: fp32 (as on CPUs without native bf16; on every machine)
    and bf16 (only where the CPU has it natively: elsewhere it is emulated, ~100x slower). A
    `PENWRIGHT_CPU_BF16=0` set for the whole run stands for a CPU without it."""
    from penwright.devices import CPU_BF16, cpu_has_native_bf16

    if request.param == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 path is emulated here")
    monkeypatch.setenv(CPU_BF16, "1" if request.param == "bf16" else "0")
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches go to a temporary folder, never ~/.cache; the hub is never contacted."""
    os.environ["PENWRIGHT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    yield


@pytest.fixture(scope="session")
def stories_csv(tmp_path_factory) -> Path:
    """192 genre-labelled synopses (genre,title,synopsis) as a CSV the test owns."""
    path = tmp_path_factory.mktemp("corpus") / "stories.csv"
    path.write_bytes(SAMPLE.read_bytes())
    return path


@pytest.fixture(scope="session")
def stories_txt(tmp_path_factory) -> Path:
    """The synopses as one plain-text file, one paragraph each."""
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n\n".join(r["synopsis"] for r in sample_rows()) + "\n")
    return path


@pytest.fixture(scope="session")
def stories_jsonl(tmp_path_factory) -> Path:
    """Prompt/completion rows: the title as prompt, the synopsis as completion."""
    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Title: {r['title']}\nStory:", "completion": " " + r["synopsis"],
                                        "genre": r["genre"]}) + "\n" for r in sample_rows()))
    return path


def tiny_config(data: Path, out: Path, **overrides):
    """A TrainConfig for a tiny scratch model that trains in seconds on 2 CPU cores."""
    from penwright import TrainConfig

    settings = dict(data=str(data), out=str(out), init="scratch", preset="tiny", vocab_size=512, block_size=64,
                    batch_size=8, max_steps=40, eval_every=0, sample_every=0, save_every=0, log_every=5,
                    precision="fp32", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stories_csv) -> Path:
    """A run dir trained once per session on the labelled stories (labels: six genres)."""
    from penwright import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train(tiny_config(stories_csv, out, text_column="synopsis", label_column="genre", max_steps=60),
                 log=lambda *_: None)


def chat_rows() -> list[dict]:
    """OpenAI-style conversations about the sample stories: asked a story's genre, the assistant answers with
    it in one word; every third has a system prompt, every other a second exchange."""
    rows = []
    for i, r in enumerate(sample_rows()):
        messages = [{"role": "system", "content": "You name genres."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"Which genre is '{r['title']}'?"},
                     {"role": "assistant", "content": f"{r['genre']}."}]
        if i % 2:
            messages += [{"role": "user", "content": "Once more?"}, {"role": "assistant", "content": f"{r['genre']}."}]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows()))
    return path


@pytest.fixture(scope="session")
def tiny_chat_run(tmp_path_factory, chat_jsonl) -> Path:
    """A tiny scratch model trained once per session on `chat_jsonl` (ChatML, the replies learned)."""
    from penwright import train

    out = tmp_path_factory.mktemp("runs") / "tiny-chat"
    return train(tiny_config(chat_jsonl, out, max_steps=50, lr=3e-3), log=lambda *_: None)


@contextlib.contextmanager
def serving(app):
    """Run an ASGI app with uvicorn on a free loopback port in a background thread; yield its URL."""
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, stories_txt) -> Path:
    """A 'pretrained' tiny GPT-2 (2 layers, 64 wide, no dropout) with its tokenizer, as a local model directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from penwright.tokens import train_tokenizer

    tokenizer = train_tokenizer(stories_txt.read_text().split("\n\n"), 512)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("base") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class FillsUp:
    """A file with room for `room` more bytes, then the error a full disk gives."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[:self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A real tmpfs of `size` (like "24m") at `mount`, for full-disk tests; skips the test without root."""
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(command, capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def one_error_line(capsys, *argv) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr, which is returned."""
    from penwright.cli import main

    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("penwright: error: "), err
    return err[0]


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB tmpfs: room for two tiny checkpoints, not three (needs root; skipped otherwise)."""
    with tmpfs(tmp_path / "disk", "24m") as mount:
        yield mount
