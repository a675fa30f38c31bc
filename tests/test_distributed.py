"""Training on several processes: real torchrun processes on the gloo backend, DDP and FSDP.

What makes the comparisons exact: the tiny model has dropout off and trains in fp32, and
plain text has no loss mask, so every rank's mean loss covers the same number of tokens. Then
averaging the ranks' gradients (DDP's all-reduce, FSDP's reduce-scatter) is the gradient of the
whole global batch, and 2 processes with batch B follow 1 process with batch 2B to rounding.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from penwright import TrainConfig, train
from penwright.cli import as_flags
from penwright.runs import read_metrics

quiet = dict(log=lambda *_: None)
STEPS, SAVE_AT = 6, 3


def base_config(data: Path, model: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), model=str(model), out=str(out), block_size=32, batch_size=8, max_steps=STEPS,
                    lr=1e-3, log_every=1, eval_every=0, eval_batches=2, sample_every=0, sample_length=8,
                    save_every=SAVE_AT, precision="fp32", seed=1)
    return TrainConfig(**{**settings, **overrides})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def penwright(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "penwright", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, stories_txt, tiny_base) -> Path:
    """One process, global batch 8: the curve the distributed runs must follow."""
    return train(base_config(stories_txt, tiny_base, tmp_path_factory.mktemp("runs") / "one"), **quiet)


def resume_in_one_process(run: Path, cfg: TrainConfig) -> None:
    """Drop the final checkpoint and continue from the middle one, unsharded, in this process."""
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    train(replace(cfg, batch_size=8, grad_accum=1, fsdp=False, resume=True), **quiet)


def test_two_processes_follow_one_and_resume_in_one(tmp_path, stories_txt, tiny_base, reference):
    cfg = base_config(stories_txt, tiny_base, tmp_path / "two", batch_size=2, grad_accum=2)  # accumulation: no_sync
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "penwright", "train", *as_flags(cfg)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = losses(reference), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (got, expected)
    assert got[STEPS] < got[1] - 0.05  # it learned, so the match is not two flat lines
    # Only rank 0 spoke, and it reported the global batch: 2 processes x 2 x 2 sequences x 32 tokens.
    assert done.stderr.count("model saved to") == 1
    assert "training 6 steps of 256 tokens (batch 2 x accumulation 2 x block 32 x 2 processes)" in done.stderr

    resume_in_one_process(tmp_path / "two", cfg)
    resumed = losses(tmp_path / "two")
    assert all(abs(resumed[s] - expected[s]) < 1e-4 for s in range(SAVE_AT + 1, STEPS + 1)), (resumed, expected)


def test_batch_size_auto_is_measured_once_and_every_rank_takes_it(tmp_path, stories_txt, tiny_base, reference):
    """Rank 0 measures and shares its plan: 2 processes x 4 sequences make the reference's step of 256 tokens."""
    cfg = base_config(stories_txt, tiny_base, tmp_path / "auto", batch_size="auto", tokens_per_step=256)
    done = penwright("train", "--nproc", "2", *as_flags(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("--batch-size auto: micro-batch 4 x accumulation 1 x block 32 x 2 processes = 256 "
                             "tokens per step") == 1, done.stderr[-3000:]
    expected, got = losses(reference), losses(tmp_path / "auto")
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (got, expected)


def test_fsdp_with_nproc_shards_saves_plain_hf_and_resumes_unsharded(tmp_path, stories_txt, tiny_base, reference):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no FSDP2 fully_shard on CPU with gloo")
    from transformers import AutoModelForCausalLM

    cfg = base_config(stories_txt, tiny_base, tmp_path / "fsdp", batch_size=2, grad_accum=2, fsdp=True)
    done = penwright("train", "--nproc", "2", *as_flags(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr
    expected, got = losses(reference), losses(tmp_path / "fsdp")
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (got, expected)

    # The checkpoint is a plain HF directory holding the full (gathered) weights.
    middle = tmp_path / "fsdp" / "checkpoints" / f"step-{SAVE_AT:08d}"
    model = AutoModelForCausalLM.from_pretrained(middle)
    reference_model = AutoModelForCausalLM.from_pretrained(reference / "checkpoints" / f"step-{SAVE_AT:08d}")
    # Up to rounding: the fused GELU kernel rounds an element differently (by 1e-7) in its vector
    # body and its scalar tail, whose place depends on the tensor size and thread count, and
    # Adam's normalised steps carry that into the weights at a few percent of one step (lr 1e-3).
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.allclose(mine, theirs, atol=1e-4), name

    resume_in_one_process(tmp_path / "fsdp", cfg)  # 2 shards -> 1 unsharded process
    resumed = losses(tmp_path / "fsdp")
    assert all(abs(resumed[s] - expected[s]) < 1e-4 for s in range(SAVE_AT + 1, STEPS + 1)), (resumed, expected)


@pytest.mark.slow  # another launch of 2 processes; kept out of the default suite's time budget
def test_nproc_bad_input_is_one_line(tmp_path, stories_txt, tiny_base):
    (tmp_path / "taken").write_text("not a folder")
    done = penwright("train", "--nproc", "2", "--data", str(stories_txt), "--model", str(tiny_base),
                     "--out", str(tmp_path / "taken"))
    assert done.returncode == 2
    assert "penwright: error: --out" in done.stderr and "Traceback" not in done.stderr


def test_a_failure_on_rank_0_ends_the_others_with_one_line(tmp_path, stories_txt, tiny_base, small_disk):
    """Rank 0 alone writes checkpoints; when the disk fills it says so, and rank 1, waiting in a collective
    that will never complete, leaves with one line instead of a gloo traceback."""
    cfg = base_config(stories_txt, tiny_base, small_disk / "run", max_steps=10_000, save_every=1,
                      keep_checkpoints=10_000)
    done = penwright("train", "--nproc", "2", *as_flags(cfg))
    assert done.returncode != 0
    assert done.stderr.count("penwright: error: disk full while saving checkpoint") == 1, done.stderr[-3000:]
    assert "penwright: rank 1: stopping because another process failed (rank 0 says why)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_each_rank_draws_its_own_dropout_and_a_step_always_the_same():
    from penwright.training import step_seed

    seeds = {(rank, step): step_seed(1, rank, step) for rank in range(4) for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)  # every rank and step its own masks
    assert all(step_seed(1, r, s) == seed for (r, s), seed in seeds.items())  # a resumed step draws the same
    assert step_seed(2, 0, 0) != seeds[0, 0]


def test_as_flags_rebuilds_the_config(stories_txt, tiny_base):
    from penwright.cli import build_parser

    cfg = base_config(stories_txt, tiny_base, "runs/x", fsdp=True, lora=None, nproc=2)
    args = vars(build_parser().parse_args(["train", *as_flags(cfg)]))
    rebuilt = args.pop("command").config(**args)
    assert rebuilt == cfg
    assert "--nproc" not in as_flags(cfg, skip=("nproc",))


@pytest.mark.slow  # another launch of 2 processes; kept out of the default suite's time budget
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, stories_txt, tiny_base):
    import psutil

    cfg = base_config(stories_txt, tiny_base, tmp_path / "stop", batch_size=4, max_steps=100_000, save_every=0)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "penwright", "train", *as_flags(cfg)], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not losses(tmp_path / "stop"):  # training has started
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(launcher.pid).children()}
        ranks["1"].send_signal(signal.SIGTERM)  # rank 0 never sees a signal
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, err[-3000:]
    step = max(losses(tmp_path / "stop"))
    assert f"stopped by a signal to another rank at step {step}" in err
    assert (tmp_path / "stop" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
