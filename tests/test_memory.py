"""Training that fits the machine: --batch-size auto under a memory budget, and gradient checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from penwright import PenwrightError, train
from penwright.cli import main
from penwright.losses import lm_loss
from penwright.memory import HEADROOM, _split, set_checkpointing

quiet = dict(log=lambda *_: None)
BLOCK = 256
TOKENS = 64 * BLOCK  # a step of 64 sequences: more than the budgets below let one micro-batch hold
# Runs `penwright train` as its only child and prints the child's peak resident memory (KiB) last.
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def auto_command(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "penwright", "train", "--data", str(data), "--out", str(out), "--init", "scratch",
            "--preset", "tiny", "--vocab-size", "512", "--block-size", str(BLOCK), "--batch-size", "auto",
            "--precision", "fp32", "--dropout", "0", "--eval-every", "0", "--eval-batches", "1", "--sample-every", "0",
            "--save-every", "0", "--seed", "1", *extra]


def run_measured(argv: list[str], prefix: list[str] = ()) -> tuple[subprocess.CompletedProcess, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([*prefix, sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    peak = int(done.stdout.split()[-1]) * 1024 if done.stdout.split() else 0
    return done, peak


def plan_of(run: Path) -> dict:
    return json.loads((run / "penwright.json").read_text())["batch"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, stories_txt) -> dict:
    """What one and two sequences of this model take in a fresh process: --batch-size auto's own trials,
    on a step of two sequences (so it tries no more)."""
    out = tmp_path_factory.mktemp("calibrate") / "run"
    done, _ = run_measured(auto_command(stories_txt, out, "--tokens-per-step", str(2 * BLOCK), "--max-steps", "1"))
    assert done.returncode == 0, done.stderr[-2000:]
    measured = plan_of(out)["measured"]
    return {"one": measured["peaks"]["1"], "per": measured["peaks"]["2"] - measured["peaks"]["1"],
            "optimizer": measured["optimizer"]}


def budget_for(calibration: dict, sequences: float) -> int:
    """A budget whose planned share holds about `sequences` sequences."""
    c = calibration
    return int((c["one"] + (sequences - 1) * c["per"] + c["optimizer"]) / HEADROOM)


def check_trained_within(run: Path, done: subprocess.CompletedProcess, peak: int, budget: int) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    plan = plan_of(run)
    assert 2 <= plan["batch_size"] < 64, plan  # the budget decided, and more than one sequence fitted
    assert plan["batch_size"] * plan["grad_accum"] * BLOCK == TOKENS  # --tokens-per-step, exactly
    assert "--batch-size auto: micro-batch" in done.stderr and "tokens per step" in done.stderr
    assert peak <= budget, f"peak {peak / 2**20:.0f} MiB over the budget of {budget / 2**20:.0f} MiB"
    info = json.loads((run / "penwright.json").read_text())
    assert info["tokens_per_step"] == TOKENS and (run / "model.safetensors").is_file()
    return plan


def test_auto_batch_size_trains_within_a_memory_limit_the_test_sets(tmp_path, stories_txt, calibration):
    budget = budget_for(calibration, 6.5)
    out = tmp_path / "run"
    done, peak = run_measured(auto_command(stories_txt, out, "--tokens-per-step", str(TOKENS), "--max-steps", "2",
                                           "--memory-limit", f"{budget // 2**20}M"))
    plan = check_trained_within(out, done, peak, budget)
    assert plan["measured"]["budget"] <= budget * HEADROOM and "--memory-limit" in plan["why"]


def cgroup_v1() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (root / "memory.limit_in_bytes").is_file():
        return None
    folder = root / f"penwright-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError:
        return None
    return folder


@pytest.mark.slow
def test_auto_batch_size_finds_and_respects_the_cgroup_limit(tmp_path, stories_txt, calibration):
    """A real cgroup whose limit kills the process if training goes past it (root only)."""
    group = cgroup_v1()
    if group is None:
        pytest.skip("needs root and a cgroup v1 memory controller to create a memory-limited cgroup")
    budget = budget_for(calibration, 6.5)
    try:
        (group / "memory.limit_in_bytes").write_text(str(budget))
        out = tmp_path / "run"
        enter = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
        done, peak = run_measured(auto_command(stories_txt, out, "--tokens-per-step", str(TOKENS), "--max-steps", "2"),
                                  prefix=enter)
        plan = check_trained_within(out, done, peak, budget)
        assert "cgroup" in plan["why"], plan["why"]
    finally:
        group.rmdir()


def test_a_resumed_auto_run_keeps_its_micro_batch(tmp_path, stories_txt):
    first = tiny_config(stories_txt, tmp_path / "run", batch_size="auto", tokens_per_step=4 * 64, max_steps=4,
                        save_every=2)
    train(first, **quiet)
    chosen = plan_of(tmp_path / "run")
    assert chosen["batch_size"] * chosen["grad_accum"] == 4
    messages = []
    # A bigger step would now choose differently; the resumed run keeps what it trained with.
    train(tiny_config(stories_txt, tmp_path / "run", batch_size="auto", tokens_per_step=16 * 64, max_steps=6,
                      save_every=2, resume=True), log=messages.append)
    kept = plan_of(tmp_path / "run")
    assert (kept["batch_size"], kept["grad_accum"]) == (chosen["batch_size"], chosen["grad_accum"])
    assert any("as the run being resumed chose" in m for m in messages)


def test_tokens_per_step_sets_the_accumulation_of_a_fixed_batch(tmp_path, stories_txt):
    run = train(tiny_config(stories_txt, tmp_path / "run", batch_size=2, tokens_per_step=8 * 64, max_steps=1), **quiet)
    info = json.loads((run / "penwright.json").read_text())
    assert (info["batch"]["batch_size"], info["batch"]["grad_accum"], info["tokens_per_step"]) == (2, 4, 512)


def test_not_even_one_sequence_fitting_says_what_would(tmp_path, stories_txt, tiny_base, capsys):
    argv = ["train", "--data", stories_txt, "--out", tmp_path / "run", "--model", tiny_base, "--block-size", "64",
            "--batch-size", "auto", "--memory-limit", "64M", "--gradient-checkpointing", "off", "--precision", "fp32"]
    assert main(list(map(str, argv))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("penwright: error: --batch-size auto: not even one sequence "
                                                     "of 64 tokens fits"), errors
    for fix in ("a smaller --block-size (now 64)", "--gradient-checkpointing on", "--lora"):
        assert fix in errors[0]
    assert "--memory-limit 64M" in errors[0]
    assert not (tmp_path / "run").exists(), "nothing half-written"


def test_tokens_per_step_smaller_than_the_models_block_is_refused(tmp_path, stories_txt):
    with pytest.raises(PenwrightError, match="--tokens-per-step 100 is smaller than one block of 256 tokens"):
        train(tiny_config(stories_txt, tmp_path / "run", block_size=None, tokens_per_step=100), **quiet)
    assert not (tmp_path / "run").exists()


# --- gradient checkpointing -----------------------------------------------------------------------

def loss_and_grads(model, x, checkpointing: bool, fused: bool, dtype) -> tuple[torch.Tensor, dict]:
    set_checkpointing(model, checkpointing)
    torch.manual_seed(3)  # the same dropout masks; checkpointing must replay them in its recompute
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = lm_loss(model, x, x, fused=fused)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("fused", [True, False], ids=["chunked-loss", "full-loss"])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cpu_path, fused, adapters):
    from transformers import GPT2Config, GPT2LMHeadModel

    from penwright import lora
    from penwright.config import LoraSpec
    from penwright.kernels import fuse_gelu, use_cpu_attention

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_layer=3, n_head=4, n_embd=64, n_positions=64, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    fuse_gelu(model)
    use_cpu_attention(model)  # penwright's attention with dropout, on the bf16 path
    if adapters:
        model = lora.attach(model, LoraSpec(r=4, alpha=8, dropout=0.1), "unused")
    model.train()
    x = torch.randint(0, 320, (3, 48))
    dtype = torch.bfloat16 if cpu_path == "bf16" else torch.float32
    loss, grads = loss_and_grads(model, x, False, fused, dtype)
    loss_ckpt, grads_ckpt = loss_and_grads(model, x, True, fused, dtype)
    assert grads and grads.keys() == grads_ckpt.keys()
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-5), name
    assert adapters == all("lora_" in name for name in grads)


@settings(max_examples=200, deadline=None)
@given(target=st.integers(1, 1 << 20), unit=st.integers(1, 4096), most=st.integers(1, 64))
def test_the_split_comes_closest_to_the_tokens_per_step(target, unit, most):
    batch, accum = _split(target, unit, most)
    assert 1 <= batch <= most and accum >= 1
    error = abs(batch * accum * unit - target)
    nearest = [(b, a) for b in range(1, most + 1) for a in {max(1, target // (b * unit)), target // (b * unit) + 1}]
    assert all(abs(b * a * unit - target) >= error for b, a in nearest)  # no other micro-batch comes closer


CHUNKED_LOSS_MEMORY = """
import json, torch
from penwright.devices import release_freed_memory
from penwright.losses import CHUNK_TOKENS, linear_cross_entropy
from penwright.memory import _status, peak_rss, reset_peak_rss

if not reset_peak_rss():
    raise SystemExit(3)
vocab, dim = 20_000, 32
weight = torch.randn(vocab, dim, requires_grad=True)
grown = {}
for tokens in (CHUNK_TOKENS, 4 * CHUNK_TOKENS):
    hidden, targets = torch.randn(tokens, dim, requires_grad=True), torch.randint(0, vocab, (tokens,))
    release_freed_memory()
    before = _status("VmRSS")
    reset_peak_rss()
    linear_cross_entropy(hidden, weight, targets).backward()
    grown[tokens] = peak_rss() - before
    weight.grad = None
print(json.dumps({"chunk_tokens": CHUNK_TOKENS, "vocab": vocab, "grown": list(grown.values())}))
"""


def test_the_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    """Memory for the loss stops growing past one chunk of tokens: what lets --batch-size auto's line
    through its first trials hold, and what the loss is chunked for. Measured in a fresh process:
    the allocator settings an earlier in-process training chose (--malloc keep) change what is resident."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", CHUNKED_LOSS_MEMORY], capture_output=True, text=True, env=env,
                          timeout=300)
    if done.returncode == 3:
        pytest.skip("needs Linux's resettable peak of resident memory")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    one, four = result["grown"]
    chunk = result["chunk_tokens"] * result["vocab"] * 4  # one chunk's fp32 log-probabilities
    assert four - one < chunk / 4, result
