"""Crash safety, proved: SIGKILL at random moments, SIGINT/SIGTERM, a full disk, NaN losses, OOM.

The kill tests start real `python -m penwright train` processes and SIGKILL them while they
start, train and write checkpoints; after every kill the run is resumed, and in the end its
weights must equal an uninterrupted run's bit for bit. `make soak` runs the long version.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FillsUp, tiny_config
from penwright import PenwrightError, TrainConfig, checkpoint, runs, train, training
from penwright.cli import as_flags

quiet = dict(log=lambda *_: None)
SHORT_SAMPLES = dict(sample_length=8)  # the samples at the end of a run are not under test here


# --- running `penwright train` in a subprocess ---------------------------------------------------

def command(cfg: TrainConfig) -> list[str]:
    """The `penwright train` command line that builds exactly `cfg`."""
    return [sys.executable, "-m", "penwright", "train", *as_flags(cfg)]


def start(cfg: TrainConfig, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(command(cfg), stdout=subprocess.DEVNULL, stderr=err)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll `condition` every millisecond; False when the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("the training process made no progress")


def saving(out: Path, pid: int | None = None) -> bool:
    """Process `pid` (or any) is writing a checkpoint, or was when a kill cut it short."""
    root = checkpoint.checkpoint_dir(out)
    return root.is_dir() and any(p.name.startswith(".tmp-step-") and (pid is None or p.name.endswith(f"-{pid}"))
                                 for p in root.iterdir())


def save_phase(out: Path, pid: int) -> str | None:
    """What a checkpoint save that process `pid` left behind was doing, judged by the files it had."""
    tmp = next(checkpoint.checkpoint_dir(out).glob(f".tmp-step-*-{pid}"), None)
    if tmp is None:
        return None
    names = {p.name for p in tmp.iterdir()}
    if checkpoint.MANIFEST in names:
        return "flushing or publishing"
    return "writing optimizer state" if checkpoint.STATE_FILE in names else "writing weights"


def training_steps(out: Path) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def resumed_from(log: str) -> int | None | str:
    """The step the run said it resumed from, None for a fresh start, "unknown" if it died first."""
    if match := re.search(r"resuming from \S+ \(step (\d+)\)", log):
        return int(match[1])
    return None if "no checkpoint to resume from" in log else "unknown"


def newest_step(out: Path) -> int | None:
    published = checkpoint.complete(out)
    return int(published[0].name.split("-")[1]) if published else None


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- SIGKILL at random moments ---------------------------------------------------------------------

def kill_and_resume(cfg: TrainConfig, kills: int, seed: int, logs: Path) -> Counter:
    """SIGKILL `kills` resumed runs at random moments, then let one finish; checks every restart.

    Moments rotate through: any time after start (imports, tokenizing, model set-up, training),
    during training, and while a checkpoint is written (the kill follows the temporary folder's
    appearance by 0-50 ms, so it lands in the weights, the optimizer state, the manifest or the
    fsync). A leftover temporary folder after the kill shows it landed mid-save.
    """
    rng, out, tally = random.Random(seed), Path(cfg.out), Counter()
    moments = ["training", "saving", "anytime"]
    for i in range(kills + 1):
        before = newest_step(out)
        log = logs / f"run-{i}.log"
        proc = start(cfg, log)
        if i < kills:
            moment = moments[i % len(moments)]
            if moment == "anytime":
                time.sleep(rng.uniform(0, 4))  # start-up (imports, data, model) and the first steps
            elif moment == "training":
                wait_for(lambda after=before or 0: bool(training_steps(out)) and training_steps(out)[-1] > after, proc)
                time.sleep(rng.uniform(0, 0.3))
            else:
                wait_for(lambda pid=proc.pid: saving(out, pid), proc)
                time.sleep(rng.uniform(0, 0.05))
            proc.kill()
        assert proc.wait(timeout=300) in (0, -signal.SIGKILL), log.read_text()[-2000:]
        text = log.read_text()
        said = resumed_from(text)
        assert said in (before, "unknown"), f"run {i} resumed from {said}, newest complete was {before}"
        if proc.returncode == 0:
            tally["finished"] += 1
            break
        tally["kills"] += 1
        tally[f"killed {moment}"] += 1
        if phase := save_phase(out, proc.pid):
            tally[f"landed mid-save, {phase}"] += 1
        # Every published checkpoint is complete: no kill ever exposes a partial one.
        assert all(checkpoint.verify(p) for p in checkpoint.complete(out))
    assert tally["finished"] == 1
    assert not saving(out), "a dead process's temporary checkpoint was left behind"
    return tally


@pytest.fixture
def one_thread():
    """Kill tests compare weights bit for bit, so every process uses one thread (the in-process
    reference run sets it for this process: put the old count back)."""
    threads = torch.get_num_threads()
    yield dict(threads=1)
    torch.set_num_threads(threads)


def check_kills(tmp_path: Path, stories_txt: Path, kills: int, seed: int, **settings) -> Counter:
    settings = {**SHORT_SAMPLES, **settings}
    reference = train(tiny_config(stories_txt, tmp_path / "reference", **settings), **quiet)
    cfg = tiny_config(stories_txt, tmp_path / "killed", resume=True, keep_checkpoints=2, **settings)
    logs = tmp_path / "logs"
    logs.mkdir()
    tally = kill_and_resume(cfg, kills, seed, logs)
    print(f"\nkill test (seed {seed}): {dict(tally)}")
    assert tally["kills"] == kills
    assert same_weights(Path(cfg.out), reference)
    return tally


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, stories_txt, one_thread):
    tally = check_kills(tmp_path, stories_txt, kills=2, seed=6, max_steps=24, save_every=3, **one_thread)
    assert tally["killed saving"] == 1


@pytest.mark.soak
def test_sigkill_20_times_then_resume_equals_uninterrupted_run(tmp_path, stories_txt, one_thread):
    seed = int(os.environ.get("PENWRIGHT_SOAK_SEED", "20"))
    check_kills(tmp_path, stories_txt, kills=20, seed=seed, max_steps=400, save_every=4, **one_thread)


# --- SIGINT and SIGTERM ----------------------------------------------------------------------------

def test_sigint_and_sigterm_save_a_checkpoint_and_exit_130_with_a_resume_hint(tmp_path, stories_txt, one_thread):
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=10_000, log_every=1, resume=True, **one_thread,
                      **SHORT_SAMPLES)
    out, stopped = Path(cfg.out), 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        log = tmp_path / f"{sig.name}.log"
        proc = start(cfg, log)
        wait_for(lambda after=stopped: bool(training_steps(out)) and training_steps(out)[-1] > after, proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]  # `train && generate` must not go on
        said = re.search(rf"stopped by {sig.name} at step (\d+); checkpoint (\S+)\. "
                         r"Continue with the same command plus --resume", log.read_text())
        assert said, log.read_text()[-2000:]
        assert int(said[1]) > stopped
        stopped = int(said[1])
        assert checkpoint.latest(out, **quiet) == Path(said[2]) and checkpoint.verify(Path(said[2]))
    assert "Traceback" not in log.read_text()
    done = train(dataclasses.replace(cfg, max_steps=stopped + 2), **quiet)
    assert training_steps(done)[-1] == stopped + 2 and (done / "model.safetensors").is_file()


# --- damaged checkpoints --------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_skipped_and_resume_uses_the_previous_one(tmp_path, stories_txt):
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=10, save_every=5, **SHORT_SAMPLES)
    out = train(cfg, **quiet)
    newest = checkpoint.checkpoint_dir(out) / "step-00000010"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    weights.write_bytes(bytes(data))
    said = []
    assert checkpoint.latest(out, log=said.append).name == "step-00000005"
    assert said == [f"warning: skipping damaged checkpoint {newest}"]
    log = []
    train(dataclasses.replace(cfg, resume=True), log=log.append)
    assert any(line.startswith("resuming from") and line.endswith("(step 5)") for line in log)
    assert checkpoint.verify(newest) and checkpoint.latest(out, **quiet) == newest


# --- a full disk -----------------------------------------------------------------------------------

def assert_kept_previous(error: str, out: Path, step: int) -> None:
    assert re.search(rf"disk full while saving checkpoint \S+step-\d+: free space .* --resume; "
                     rf"the previous checkpoint step-{step:08d} is intact", error)
    latest = checkpoint.latest(out, **quiet)
    assert latest is not None and latest.name == f"step-{step:08d}" and checkpoint.verify(latest)
    assert not saving(out), "the half-written checkpoint was left behind"


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, stories_txt, monkeypatch):
    opened = []

    def open_on_full_disk(path, mode="r", *args, **kwargs):  # the second checkpoint's state file fills the disk
        opened.append("w" in mode)
        file = open(path, mode, *args, **kwargs)
        return FillsUp(file, room=4096) if "w" in mode and sum(opened) == 2 else file

    monkeypatch.setattr(checkpoint, "open", open_on_full_disk, raising=False)
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=10, save_every=5)
    with pytest.raises(PenwrightError) as error:
        train(cfg, **quiet)
    assert_kept_previous(str(error.value), Path(cfg.out), step=5)


def test_full_disk_while_appending_metrics_is_one_line_and_keeps_the_checkpoint(tmp_path, stories_txt, monkeypatch):
    appended = []

    def open_on_full_disk(path, mode="r", *args, **kwargs):  # metrics.jsonl fills the disk after step 6
        if "a" in mode:
            appended.append(path)
            if len(appended) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runs, "open", open_on_full_disk, raising=False)
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=20, log_every=2, save_every=2)
    with pytest.raises(PenwrightError, match=r"disk full while appending to \S+metrics.jsonl: free space on that "
                                             r"disk, then continue with the same command plus --resume; the "
                                             r"newest checkpoint, step-00000004, is intact"):
        train(cfg, **quiet)
    assert checkpoint.verify(checkpoint.latest(Path(cfg.out), **quiet))


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path, stories_txt, small_disk):
    cfg = tiny_config(stories_txt, small_disk / "run", max_steps=6, save_every=2, keep_checkpoints=3)
    with pytest.raises(PenwrightError) as error:
        train(cfg, **quiet)
    assert_kept_previous(str(error.value), Path(cfg.out), step=4)


# --- non-finite losses and running out of memory ---------------------------------------------------

def poison_steps(monkeypatch, bad) -> None:
    """Make the loss NaN on the training steps (1-based) for which `bad(step)` is true."""
    real_loss, calls = training.lm_loss, Counter()

    def lm_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an evaluation batch
            calls["step"] += 1
            if bad(calls["step"]):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "lm_loss", lm_loss)


def test_a_few_non_finite_steps_are_skipped(tmp_path, stories_txt, monkeypatch):
    poison_steps(monkeypatch, lambda step: step in (3, 7, 8))
    run = train(tiny_config(stories_txt, tmp_path / "run", max_steps=12, max_bad_steps=3, **SHORT_SAMPLES), **quiet)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) == 3
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # the skipped losses are left out
    assert all(t.isfinite().all() for t in load_file(run / "model.safetensors").values())


def test_too_many_non_finite_steps_stop_naming_the_step_and_keep_the_checkpoint(tmp_path, stories_txt,
                                                                                monkeypatch):
    poison_steps(monkeypatch, lambda step: step >= 7)
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=40, save_every=5, max_bad_steps=2)
    with pytest.raises(PenwrightError, match=r"training stopped at step 10: 4 steps had a non-finite loss or "
                                             r"gradient \(the first at step 7\), more than --max-bad-steps 2; "
                                             r"the last good checkpoint is \S+step-00000005"):
        train(cfg, **quiet)
    latest = checkpoint.latest(Path(cfg.out), **quiet)
    assert latest.name == "step-00000005" and checkpoint.verify(latest)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"),
                                   MemoryError()])
def test_out_of_memory_suggests_a_smaller_batch_with_accumulation(tmp_path, stories_txt, monkeypatch, error):
    real_loss = training.lm_loss

    def lm_loss(*args, **kwargs):
        if torch.is_grad_enabled():  # training, not the evaluation before it
            raise error
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "lm_loss", lm_loss)
    with pytest.raises(PenwrightError, match=r"out of memory with --batch-size 8 .*--batch-size 4 --grad-accum 2"):
        train(tiny_config(stories_txt, tmp_path / "run", eval_batches=1, max_steps=2), **quiet)
