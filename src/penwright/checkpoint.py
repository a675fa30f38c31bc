"""Checkpoints that are complete or absent, never half-written.

A checkpoint is an HF model directory (loadable on its own) plus `trainer_state.pt` (optimizer,
scheduler, RNG states, step) and, written last, `manifest.json` with every file's size and
SHA-256. It is assembled in a hidden temporary folder and published by one rename, so a crash
at any moment leaves either the previous checkpoints or the new one, and resume verifies the
manifest before trusting a checkpoint.

torch and transformers are imported where a checkpoint is written or read, so that listing runs
(`penwright runs`) stays quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from . import files

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
NAME = re.compile(r"^step-(\d{8})$")
BEST = "best"  # --keep-best: the weights of the best evaluation, apart from the rotating step-* ones


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, model, tokenizer, state: dict, keep: int, weights: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (`weights`: a gathered FSDP state dict)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    previous = next(iter(complete(run_dir)), None)
    hint = ("continue with --resume; "
            + (f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists")
            + " (--keep-checkpoints 1 needs less room)")
    _write(final, hint, step, model, tokenizer, state, weights)
    _prune(root, keep)
    return final


def best_dir(run_dir: Path) -> Path:
    return checkpoint_dir(run_dir) / BEST


def save_best(run_dir: Path, step: int, model, tokenizer, val_loss: float, weights: dict | None = None) -> Path:
    """Write the weights of step `step`, the best evaluated so far, to checkpoints/best (replacing the last best)."""
    final = best_dir(run_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale(final.parent, f".tmp-{BEST}-*")
    hint = "continue with --resume; the previous best checkpoint is intact"
    _write(final, hint, step, model, tokenizer, {"step": step, "val_loss": val_loss}, weights)
    return final


def _write(final: Path, hint: str, step: int, model, tokenizer, state: dict, weights: dict | None) -> None:
    import torch

    from .models import save_model

    with files.staged_dir(final, f"saving checkpoint {final}", hint, publish=_replace_step, shared=False) as tmp:
        save_model(model, tokenizer, tmp, weights)
        with open(tmp / STATE_FILE, "wb") as f:  # a file object keeps a full disk's OSError visible
            torch.save(state, f)
        files.write_text(tmp / MANIFEST, json.dumps({"step": step, "files": _describe(tmp)}, indent=1))


def _replace_step(tmp: Path, final: Path) -> None:
    if final.exists():  # a stale copy of the same step (from a run that was resumed earlier)
        _discard(final)
    os.rename(tmp, final)


def publish_model(run_dir: Path, model, tokenizer, weights: dict | None = None) -> None:
    """Write the run dir's own HF model so that no reader ever sees a half-written file.

    The files are written and flushed in a hidden folder, then each moves into place with one
    rename; the weights go last. A crash before then leaves the previous files, or none.
    """
    from .models import save_model

    run_dir = Path(run_dir)
    files.remove_stale(run_dir, ".tmp-model-*")
    hint = "run the same command with --resume to finish from the last checkpoint"
    with files.staged_dir(run_dir / "model", f"writing the model into {run_dir}", hint, publish=_move_files) as tmp:
        save_model(model, tokenizer, tmp, weights)


def _move_files(tmp: Path, final: Path) -> None:
    """Into the run dir (`final`'s parent) one file at a time, the weights last."""
    for file in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):
        os.replace(file, final.parent / file.name)


def _describe(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, checksums: bool = True) -> bool:
    """True when the manifest exists and every file it lists has its size (and checksum)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            file = path / name
            if file.stat().st_size != info["size"] or (checksums and _sha256(file) != info["sha256"]):
                return False
        return STATE_FILE in manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete(run_dir: Path) -> list[Path]:
    """Published checkpoints, newest first (not yet verified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if NAME.match(p.name)), key=lambda p: p.name, reverse=True)


def latest(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint whose manifest verifies; damaged ones are reported and skipped.

    Temporary folders that dead processes left mid-save are removed on the way.
    """
    files.remove_stale(checkpoint_dir(run_dir), ".tmp-step-*")
    for path in complete(run_dir):
        if verify(path):
            return path
        log(f"warning: skipping damaged checkpoint {path}")
    return None


def load_state(path: Path) -> dict:
    import torch

    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def _prune(root: Path, keep: int) -> None:
    for old in complete(root.parent)[keep:]:
        _discard(old)
    files.remove_stale(root, ".tmp-step-*")


def _discard(path: Path) -> None:
    """Unpublish with one rename, then delete: a kill mid-delete leaves only a hidden temp folder,
    never a half-deleted step-* that looks published."""
    hidden = path.with_name(f".tmp-{path.name}-discarded-{os.getpid()}")
    os.rename(path, hidden)
    files.remove(hidden)
