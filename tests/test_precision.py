"""Both CPU precision paths, on every machine: fp32 (what a CPU without native bf16 gets) everywhere,
bf16 where the CPU has it natively. `PENWRIGHT_CPU_BF16` forces the choice (the `cpu_path` fixture)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from penwright.devices import pick_dtype


@pytest.mark.parametrize("forced, dtype", [("0", torch.float32), ("1", torch.bfloat16)])
def test_auto_precision_follows_the_cpu_and_the_override(monkeypatch, forced, dtype):
    monkeypatch.setenv("PENWRIGHT_CPU_BF16", forced)
    assert pick_dtype("auto", torch.device("cpu")) == dtype
    assert pick_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice is kept


def test_auto_never_picks_emulated_bf16(monkeypatch):
    monkeypatch.delenv("PENWRIGHT_CPU_BF16", raising=False)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (pick_dtype("auto", torch.device("cpu")) == torch.bfloat16) == native


def test_training_learns_on_each_cpu_path(cpu_path, stories_txt, tmp_path):
    from penwright import train

    run = train(tiny_config(stories_txt, tmp_path / "run", precision="auto", max_steps=30, lr=3e-3),
                log=lambda *_: None)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses


def test_writing_on_each_cpu_path_agrees_with_fp32(cpu_path, tiny_run):
    """What `penwright generate` picks by default on this path (precision auto, --quantize int8) writes
    nearly the greedy tokens of the plain fp32 model."""
    from penwright.config import SampleConfig
    from penwright.generate import load

    quiet = {"log": lambda *_: None, "device": "cpu"}
    fast = load(str(tiny_run), quantize="int8", **quiet)
    plain = load(str(tiny_run), precision="fp32", quantize="none", **quiet)
    layers = {type(m).__name__ for m in fast.model.modules()} & {"Linear", "Int8Linear"}
    assert layers == {"Int8Linear"}, "int8 weights on this path too, fp32 compute included"
    assert next(fast.model.parameters()).dtype == (torch.bfloat16 if cpu_path == "bf16" else torch.float32)
    cfg = SampleConfig(greedy=True, max_new_tokens=24)
    got, want = (w.samples(["The ghost", "A detective", None], cfg) for w in (fast, plain))
    tokens = [(fast.tokenizer.encode(a.text), plain.tokenizer.encode(b.text)) for a, b in zip(got, want)]
    same = sum(x == y for a, b in tokens for x, y in zip(a, b))
    assert same >= 0.75 * sum(len(b) for _, b in tokens)


def test_explicit_bf16_on_a_cpu_without_it_warns_once_and_still_runs(monkeypatch):
    monkeypatch.setenv("PENWRIGHT_CPU_BF16", "0")
    said = []
    assert pick_dtype("bf16", torch.device("cpu"), log=said.append) == torch.bfloat16
    assert len(said) == 1 and "emulated" in said[0] and "slower than fp32" in said[0] and "\n" not in said[0]
    monkeypatch.setenv("PENWRIGHT_CPU_BF16", "1")
    assert pick_dtype("bf16", torch.device("cpu"), log=said.append) == torch.bfloat16 and len(said) == 1


def test_auto_device_takes_apple_mps_where_present_and_never_its_bf16(monkeypatch):
    from penwright import PenwrightError, devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    mps = devices.pick_device("auto")
    assert mps.type == "mps" and devices.pick_dtype("auto", mps) == torch.float32
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.pick_device("auto").type == "cpu"
    with pytest.raises(PenwrightError, match="no Apple GPU"):
        devices.pick_device("mps")
