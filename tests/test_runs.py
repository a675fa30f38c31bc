"""The run directory: one process at a time trains or exports it; what it publishes is readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from penwright import PenwrightError, checkpoint, runs
from penwright.cli import as_flags, main


def penwright(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "penwright", *args], env=env, **popen)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the process ended first"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("penwright: error: "), err
    return err[0]


# --- the lock -------------------------------------------------------------------------------------

def test_a_run_in_training_refuses_a_second_train_and_export_and_a_kill_frees_it(tmp_path, stories_txt, capsys):
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=100_000, save_every=5, threads=1, sample_length=8)
    first = penwright("train", *as_flags(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: bool(checkpoint.complete(cfg.out)), first)
        argv = ["train", *as_flags(cfg)]
        for extra in (["--resume"], ["--overwrite"], []):
            line = one_line(capsys, argv + extra)
            assert f"penwright train (pid {first.pid}) holds it" in line and f"kill {first.pid}" in line, line
        line = one_line(capsys, ["export", "--merge", cfg.out, "--out", str(tmp_path / "merged")])
        assert f"pid {first.pid}" in line and not (tmp_path / "merged").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The kernel dropped the dead process's lock: the same command plus --resume goes on.
    step = int(checkpoint.complete(cfg.out)[0].name.split("-")[1])
    assert main(argv + ["--resume", "--max-steps", str(step)]) == 0
    assert (Path(cfg.out) / "model.safetensors").is_file()
    runs.lock(Path(cfg.out), "train")  # and the finished train let go of it
    runs.release(Path(cfg.out))


def test_a_fresh_run_dir_is_locked_once_created(tmp_path):
    """Two trainings that both found --out missing: the second to create it finds the first's lock."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from penwright import runs\n"
        f"Path({str(tmp_path / 'run')!r}).mkdir(); runs.lock(Path({str(tmp_path / 'run')!r}), 'train')\n"
        "print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = runs.RunDir(tmp_path / "run")
        with pytest.raises(PenwrightError, match=f"pid {holder.pid}"):
            run.create()
    finally:
        holder.kill()
        holder.wait()
    run.create()
    assert runs.held(run.path)
    runs.release(run.path)
