"""The run directory: the unit everything downstream takes a path to.

    runs/NAME/
      config.json, model.safetensors, tokenizer files, generation_config.json   (plain HF model)
      README.md        model card: data, hyper-parameters, perplexity, samples
      penwright.json   the TrainConfig, corpus stats and results
      metrics.jsonl    one JSON record per logged step, evaluation and sample
      loss.png         training and validation loss
      checkpoints/     step-NNNNNNNN/ (see checkpoint.py)
      .lock            held (flock) by the process training or exporting the run, with its pid

One process at a time may train or export a run: `lock` takes an OS file lock, which the kernel
drops when the process ends, however it ends (SIGKILL included), so a lock is never left stuck.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

from . import files
from .config import TrainConfig
from .errors import PenwrightError
from .words import plural

RUN_FILE = "penwright.json"
LOCK_FILE = ".lock"
ENDINGS = {"stopped", "crashed"}  # the metrics.jsonl record of a run that ended before finishing says which
# Settings that make a run a different run; changing others (steps, eval cadence) is fine on resume.
IDENTITY = ("data", "val_file", "model", "init", "preset", "tokenizer", "text_column", "label_column",
            "prompt_column", "completion_column", "line_by_line", "keep_line_breaks", "val_fraction", "block_size",
            "seed", "lora", "format", "train_on")


class RunDir:
    replace = False  # set by claim() for --overwrite: create() empties the folder

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.mirrors = []  # viewers (--log) that get a copy of every metrics record

    @classmethod
    def claim(cls, cfg: TrainConfig) -> "RunDir":
        """Check that --out may hold this run (honouring --resume and --overwrite) and hold its lock
        (`release` lets go); changes nothing yet."""
        if not cfg.out:
            raise PenwrightError("no run directory given: pass --out runs/NAME")
        run = cls(Path(cfg.out))
        if run.path.exists() and not run.path.is_dir():
            raise PenwrightError(f"--out {run.path} is a file; give a folder")
        if run.path.is_dir():
            lock(run.path, "train")  # before looking inside: a run in progress is no state to judge
        try:
            run._check(cfg)
        except BaseException:
            release(run.path)
            raise
        return run

    def _check(self, cfg: TrainConfig) -> None:
        """Whether --out may hold this run: empty, or this run again with --resume, or --overwrite."""
        # Hidden names are temporary files of an atomic write a crash cut short: they do not count.
        if self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir()):
            previous = self.read_config()
            if cfg.overwrite:
                if previous is None and not (self.path / "config.json").is_file():
                    raise PenwrightError(f"--out {self.path} holds files that are not a penwright run; "
                                         "refusing to delete them even with --overwrite: choose another --out")
                self.replace = True
            elif previous is None:
                raise PenwrightError(f"--out {self.path} is not empty and holds no penwright run; "
                                     "choose another folder")
            elif not cfg.resume:
                raise PenwrightError(f"--out {self.path} already holds a run: add --resume to continue it "
                                     "or --overwrite to start again")
            else:
                # a setting newer than the run's penwright.json had its default there
                defaults = {k: TrainConfig.__dataclass_fields__[k].default for k in IDENTITY}
                changed = [k for k in IDENTITY if previous.get(k, defaults[k]) != getattr(cfg, k)]
                if changed:
                    raise PenwrightError(f"--out {self.path} holds a different run (--{changed[0].replace('_', '-')} "
                                         f"was {previous.get(changed[0])!r}); use another --out or --overwrite")

    def create(self) -> None:
        """Make the folder (emptying it first for --overwrite), once the run's inputs have been checked,
        and hold its lock if `claim` found no folder to lock."""
        if self.replace:
            for entry in self.path.iterdir():
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if self.path.is_dir() and held(self.path):
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock(self.path, "train")
        if any(not p.name.startswith(".") for p in self.path.iterdir()):
            release(self.path)
            raise PenwrightError(f"--out {self.path}: another process started a run there meanwhile; "
                                 "choose another --out")

    # --- settings and results -----------------------------------------------------------------

    def read_config(self) -> dict | None:
        return self.read_info().get("config")

    def read_info(self) -> dict:
        """penwright.json: the settings, corpus statistics, plan and results ({} when absent or unreadable)."""
        try:
            info = json.loads((self.path / RUN_FILE).read_text())
            return info if isinstance(info, dict) and isinstance(info.get("config"), dict) else {}
        except (OSError, ValueError):
            return {}

    def write_info(self, cfg: TrainConfig, **info) -> None:
        files.write_text(self.path / RUN_FILE, json.dumps({"config": asdict(cfg), **info}, indent=2, default=str))

    # --- metrics ------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for mirror in self.mirrors:
                mirror.record(record)
        except OSError as e:
            if not files.disk_full(e):
                raise
            from .checkpoint import complete

            newest = complete(self.path)
            kept = f"the newest checkpoint, {newest[0].name}, is intact" if newest else "no checkpoint was written yet"
            raise PenwrightError(f"disk full while appending to {self.metrics_path}: free space on that disk, then "
                                 f"continue with the same command plus --resume; {kept}") from None

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()
        self.mirrors = []

    def forget_after(self, step: int) -> None:
        """Drop records past `step`, written by a run that died before its next checkpoint, and the
        note of how the previous attempt ended: this one is under way."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step and not ENDINGS & r.keys()]
        files.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot_loss(self) -> Path:
        return plot_losses({self.path.name: self.metrics()}, self.path / "loss.png")

    # --- model card ---------------------------------------------------------------------------

    def write_card(self, cfg: TrainConfig, stats: dict, results: dict, samples: list[str]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in results.items())
        settings = {k: v for k, v in asdict(cfg).items() if v not in (None, False, []) and k not in _unused(cfg)}
        labels = ", ".join(f"{k} ({v})" for k, v in stats.get("labels", {}).items()) or "none"
        text = "\n".join([
            "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [penwright]", "---", "",
            f"# {self.path.name}", "",
            _origin(cfg), "",
            "## Data", "",
            f"{plural(stats.get('documents', 0), 'document')}, {plural(stats.get('characters', 0), 'character')}, "
            f"{stats.get('train_tokens')} training and {stats.get('val_tokens')} validation tokens. "
            f"Labels: {labels}.", "",
            "## Results", "", "| metric | value |", "| --- | --- |", rows, "",
            "## Training settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", "",
            "## Samples", "", *[f"> {s.strip()}\n" for s in samples], "",
            "## Use", "", "```python", "from transformers import pipeline",
            f"writer = pipeline('text-generation', model='{self.path}')",
            "print(writer('Once upon a time')[0]['generated_text'])",
            "```", "",
        ])
        files.write_text(self.path / "README.md", text)


# --- the lock -------------------------------------------------------------------------------------

_held: dict[Path, object] = {}  # run dir -> the open lock file this process holds


def lock(path: Path, doing: str) -> None:
    """Hold the run dir's lock until `release(path)` or the end of this process, or refuse in one
    line naming the process that holds it. `doing` (train, export) is recorded with the pid."""
    import fcntl

    key = Path(path).resolve()
    handle = os.fdopen(os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid, _, what = handle.read().strip().partition(" ")
        handle.close()
        holder = f"penwright {what or 'train'} (pid {pid})" if pid.isdigit() else "another penwright process"
        raise PenwrightError(f"{path} is in use: {holder} holds it; wait for it to finish"
                             + (f" or stop it (kill {pid})" if pid.isdigit() else "")
                             + ", or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {doing}\n")
    handle.flush()
    _held[key] = handle


def held(path: Path) -> bool:
    return Path(path).resolve() in _held


def holder(path: Path) -> str | None:
    """What holds the run dir's lock (train, export), or None when nothing does."""
    import fcntl

    try:
        with open(Path(path) / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip().partition(" ")[2] or "train"
    except OSError:  # no lock file: never locked
        pass
    return None


def release(path: Path) -> None:
    """Let go of the run dir's lock (no-op when this process does not hold it)."""
    handle = _held.pop(Path(path).resolve(), None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def locked(path: Path, doing: str):
    """Hold the run dir's lock for the block. A folder this process cannot write to (a model
    someone else owns) cannot be training, so it is read without one."""
    try:
        lock(path, doing)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        release(path)


def _origin(cfg: TrainConfig) -> str:
    """The model card's first line: what was trained from what."""
    if cfg.init == "scratch":
        vocabulary = (f"the tokenizer of `{cfg.tokenizer}`" if cfg.tokenizer
                      else f"a {cfg.vocab_size}-token BPE trained on that text")
        return f"A GPT-2 ({cfg.preset} preset) trained from scratch with penwright on `{cfg.data}`, with {vocabulary}."
    if cfg.lora:
        return f"LoRA adapters (`{cfg.lora}`) for `{cfg.model}`, trained with penwright on `{cfg.data}`."
    return f"`{cfg.model}` fine-tuned with penwright on `{cfg.data}`."


def _unused(cfg: TrainConfig) -> tuple[str, ...]:
    """Settings that did nothing in this run: the scratch model's shape for a fine-tune, the model to
    start from for a scratch run (and the BPE's size when a tokenizer was given)."""
    if cfg.init == "pretrained":
        return ("preset", "vocab_size")
    return ("model", "trust_remote_code") + (("vocab_size",) if cfg.tokenizer else ())


def trained_context(path: Path) -> int | None:
    """The block size a run dir was trained on (None for other models): the context it is scored in,
    as positions past it hold what the base model knew, not what the run learned."""
    try:
        return int(json.loads((Path(path) / RUN_FILE).read_text())["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def learned_context(path: Path) -> int | None:
    """The block size of a run trained from scratch: it never saw later positions, and text
    sampled past them is noise. None for other models (pretraining taught them their context)."""
    try:
        scratch = json.loads((Path(path) / RUN_FILE).read_text())["config"]["init"] == "scratch"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return trained_context(path) if scratch else None


def check_finished(path: Path) -> None:
    """A run dir still in training holds no final model yet: say so, and which checkpoint to use."""
    path = Path(path)
    final = ("config.json", "adapter_config.json")  # a full model, or a LoRA run's adapter
    if (path / RUN_FILE).is_file() and not any((path / name).is_file() for name in final):
        from .checkpoint import complete

        newest = complete(path)
        hint = f"use its newest checkpoint, {newest[0]}" if newest else "wait for its first checkpoint"
        raise PenwrightError(f"{path}: training has not finished, so there is no final model yet; {hint}")


def read_metrics(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return records


def plot_losses(runs: dict[str, list[dict]], path: Path) -> Path:
    """Training (line) and validation (dots) loss per step for one or more runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
        prefix = f"{name} " if len(runs) > 1 else ""
        if train:
            line, = ax.plot(*zip(*train), label=f"{prefix}train")
            color = line.get_color()
        else:
            color = None
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{prefix}validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with files.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --- listing runs (`penwright runs`) ------------------------------------------------------------

def this_process() -> dict:
    """Who is training a run, recorded in penwright.json: where (`penwright runs` asks this machine's lock, or
    another's metrics) and from which folder (its continue command)."""
    return {"host": socket.gethostname(), "cwd": os.getcwd()}


def find_runs(root: Path) -> list[Path]:
    """`root` if it is a run dir, else the run dirs below it (not below a run dir), sorted."""
    root = Path(root)
    if (root / RUN_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise PenwrightError(f"{root}: no such folder; give the folder that holds your run dirs (default runs/)")
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += find_runs(child)
    return found


def summary(path: Path) -> dict | None:
    """What `penwright runs` says of one run dir; None for a folder penwright.json does not describe."""
    from .checkpoint import complete, verify

    run = RunDir(path)
    info = run.read_info()
    if not info:
        return None
    config, records = info["config"], run.metrics()
    newest = next((c for c in complete(path) if verify(c, checksums=False)), None)
    ppl = [r["val_ppl"] for r in records if r.get("step", 0) > 0 and _finite(r.get("val_ppl"))]
    state = _state(run, info, records)
    return {"run": str(path), "model": _model_name(config), "data": config.get("data"),
            "steps_done": max((r.get("step", 0) for r in records), default=0),
            "steps_planned": info.get("total_steps"), "best_val_ppl": min(ppl, default=None), "state": state,
            "resumable": state in ("stopped", "crashed") and newest is not None,
            "checkpoint": newest.name if newest else None, "config": config,
            "cwd": (info.get("process") or {}).get("cwd")}


def _state(run: RunDir, info: dict, records: list[dict]) -> str:
    """finished, stopped (by a signal, after saving), crashed (an error, or killed: its process is gone
    without a word) or running."""
    if "results" in info and any((run.path / name).is_file() for name in ("config.json", "adapter_config.json")):
        return "finished"
    ending = ENDINGS & (records[-1].keys() if records else set())
    if ending:
        return ending.pop()
    return "running" if _running(info.get("process") or {}, run.path, run.metrics_path) else "crashed"


def _running(process: dict, run: Path, metrics: Path) -> bool:
    """A process trains the run: on this machine, it holds the run dir's lock (the kernel lets go of it
    when the process dies, however it dies). A run trained on another machine counts as running while
    its metrics.jsonl changed in the last ten minutes."""
    if not process:  # a run from before penwright recorded it
        return False
    if process.get("host") == socket.gethostname():
        return holder(run) == "train"
    try:
        return time.time() - metrics.stat().st_mtime < 600
    except OSError:
        return False


def _model_name(config: dict) -> str:
    if config.get("init") == "scratch":
        return f"scratch ({config.get('preset')})"
    return f"{config.get('model')}" + (" + LoRA" if config.get("lora") else "")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
