"""Watching runs: TensorBoard event files that hold what metrics.jsonl holds, and `penwright runs`,
which tells finished, running, stopped and crashed runs apart and says how to continue each."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from penwright import TrainConfig, checkpoint, train, training
from penwright.cli import as_flags, build_parser, main
from penwright.viewers import FINAL, SAMPLES, SCALARS

quiet = dict(log=lambda *_: None)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_hold_the_numbers_of_metrics_jsonl_across_a_crash_and_resume(tmp_path, stories_txt,
                                                                                        monkeypatch):
    cfg = tiny_config(stories_txt, tmp_path / "run", max_steps=8, save_every=4, eval_every=4, sample_every=4,
                      sample_length=8, log_every=2, log="tensorboard")
    calls, real_loss = {"n": 0}, training.lm_loss

    def crash_at_step_7(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "lm_loss", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, **quiet)  # logged steps 5 and 6 past its checkpoint at step 4
    monkeypatch.setattr(training, "lm_loss", real_loss)
    run = train(replace(cfg, resume=True), **quiet)

    records, board = metrics(run), events(run)
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    for tags, final in ((SCALARS, False), (FINAL, True)):
        for key, tag in tags.items():
            expected = [(r["step"], r[key]) for r in records if key in r and bool(r.get("final")) == final]
            got = [(e.step, e.value) for e in board.Scalars(tag)]
            assert [s for s, _ in got] == [s for s, _ in expected], tag  # the crashed attempt's 5, 6 purged
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # float32
    samples = [(r["step"], r["sample"]) for r in records if "sample" in r]
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in board.Tensors(f"{SAMPLES}/text_summary")]
    assert texts == samples and len(samples) == 2


# --- penwright runs ------------------------------------------------------------------------------

def start(cfg: TrainConfig, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "penwright", "train", *as_flags(cfg)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)


def listed(root: Path, capsys) -> dict[str, dict]:
    capsys.readouterr()  # what training printed
    assert main(["runs", str(root), "--json"]) == 0
    return {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out)}


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not checkpoint.complete(run):
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_runs_tells_finished_killed_and_interrupted_runs_apart(tmp_path, stories_txt, capsys):
    root = tmp_path / "runs"
    train(tiny_config(stories_txt, root / "finished", max_steps=2, eval_every=1), **quiet)
    long = dict(max_steps=100_000, save_every=2, log_every=1)
    configs = {name: tiny_config(stories_txt, root / name, **long) for name in ("killed", "interrupted")}
    procs = {name: start(cfg, tmp_path / f"{name}.log") for name, cfg in configs.items()}
    try:
        for name, proc in procs.items():
            wait_for_checkpoint(root / name, proc, tmp_path / f"{name}.log")
        running = listed(root, capsys)
        assert {name: r["state"] for name, r in running.items()} == \
            {"finished": "finished", "killed": "running", "interrupted": "running"}
        assert running["killed"]["continue"] is None
        procs["killed"].send_signal(signal.SIGKILL)
        procs["interrupted"].send_signal(signal.SIGINT)  # Ctrl+C: finish the step, save, exit 130
        assert procs["killed"].wait(timeout=120) == -signal.SIGKILL
        assert procs["interrupted"].wait(timeout=120) == 130
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    runs = listed(root, capsys)
    assert {name: (r["state"], r["resumable"]) for name, r in runs.items()} == {
        "finished": ("finished", False), "killed": ("crashed", True), "interrupted": ("stopped", True)}
    finished = runs["finished"]
    assert (finished["steps_done"], finished["steps_planned"], finished["model"]) == (2, 2, "scratch (tiny)")
    evaluated = [r["val_ppl"] for r in metrics(root / "finished") if r["step"] and "val_ppl" in r]
    assert finished["best_val_ppl"] == min(evaluated)
    for name in ("killed", "interrupted"):
        r = runs[name]
        assert r["steps_planned"] == 100_000 and r["steps_done"] >= 2 and r["checkpoint"].startswith("step-")
        argv = shlex.split(r["continue"])  # the command rebuilds the run's own settings, plus --resume
        assert argv[:2] == ["penwright", "train"] and argv[-1] == "--resume"
        args = vars(build_parser().parse_args(argv[1:]))
        rebuilt = TrainConfig(**{k: v for k, v in args.items() if k != "command"})
        assert asdict(rebuilt) == asdict(replace(configs[name], resume=True))

    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and "crashed, resumable from step-" in table and "stopped, resumable from step-" in table
    assert f"continue {runs['interrupted']['run']}:\n  {runs['interrupted']['continue']}\n" in table
