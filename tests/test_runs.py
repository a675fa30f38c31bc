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


# --- what is published is readable as the umask says ----------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640  # the mode a plain open() gives under this umask
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in Path(folder).rglob("*") if p.is_file()}


def test_published_files_get_the_mode_the_umask_gives(tmp_path, stories_txt, tiny_base,
                                                      umask_027):
    from penwright import EvalConfig, evaluate, train

    cache = tmp_path / "cache"
    full = train(tiny_config(stories_txt, tmp_path / "full", max_steps=4, save_every=2, sample_length=8,
                             cache_dir=str(cache)), log=lambda *_: None)
    lora = train(tiny_config(stories_txt, tmp_path / "lora", init="pretrained", model=str(tiny_base), max_steps=2,
                             lora="r=2,alpha=4,dropout=0", block_size=32, sample_length=8, cache_dir=str(cache)),
                 log=lambda *_: None)
    assert main(["export", "--merge", str(lora), "--out", str(tmp_path / "merged")]) == 0
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(stories_txt.read_text()[:2000])
    evaluate(EvalConfig(model=[str(full)], data=str(held_out), out=str(tmp_path / "report"), max_new_tokens=4,
                        num_samples=1), log=lambda *_: None)
    samples = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(full), "--max-new-tokens", "4", "--num-samples", "2",
                 "--output", str(samples)]) == 0
    published = {"run": {k: v for k, v in modes(full).items() if not k.startswith("checkpoints")},
                 "lora run": {k: v for k, v in modes(lora).items() if not k.startswith("checkpoints")},
                 "merged": modes(tmp_path / "merged"), "cache": modes(cache), "report": modes(tmp_path / "report"),
                 "samples": {samples.name: samples.stat().st_mode & 0o777}}
    for where, found in published.items():
        assert found and set(found.values()) == {umask_027}, (where, {k: oct(v) for k, v in found.items()})
    for name in ("model.safetensors", "loss.png", "README.md", "tokenizer.json"):
        assert name in published["run"]
    assert "model.safetensors" in published["merged"] and "loss.png" in published["report"]


# --- the model card ---------------------------------------------------------------------------------

def test_the_model_card_says_how_the_model_was_made_and_only_the_settings_that_did_something(
        tiny_run, tmp_path, stories_txt, tiny_base):
    import json
    import re

    from penwright import train

    def card(run: Path) -> tuple[str, dict]:
        text = (run / "README.md").read_text()
        return text, json.loads(re.search(r"```json\n(.*?)\n```", text, re.S)[1])

    text, settings = card(tiny_run)
    assert "trained from scratch" in text and "fine-tuned" not in text and "512-token BPE" in text
    assert settings["preset"] == "tiny" and "model" not in settings
    tuned = train(tiny_config(stories_txt, tmp_path / "tuned", init="pretrained", model=str(tiny_base), max_steps=1,
                              block_size=32, sample_length=4), log=lambda *_: None)
    text, settings = card(tuned)
    assert f"`{tiny_base}` fine-tuned with penwright" in text and "from scratch" not in text
    assert settings["model"] == str(tiny_base) and "preset" not in settings and "vocab_size" not in settings


def test_a_gguf_export_of_a_run_in_training_is_refused(tiny_run, tmp_path, capsys):
    """A finished run trained further (--resume with more steps): its lock, held by another process as
    a training holds it, stops `export --gguf` before it reads the run."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from penwright import runs\n"
        f"runs.lock(Path({str(run)!r}), 'train'); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line(capsys, ["export", "--gguf", str(run), "--out", str(tmp_path / "x.gguf")])
        assert f"penwright train (pid {holder.pid}) holds it" in line and not (tmp_path / "x.gguf").exists()
    finally:
        holder.kill()
        holder.wait()
