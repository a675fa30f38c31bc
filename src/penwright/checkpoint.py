"""Checkpoints that are complete or absent, never half-written.

A checkpoint is an HF model directory (loadable on its own) plus `trainer_state.pt` (optimizer,
scheduler, RNG states, step) and, written last, `manifest.json` with every file's size and
SHA-256. It is assembled in a hidden temporary folder and published by one rename, so a crash
at any moment leaves either the previous checkpoints or the new one, and resume verifies the
manifest before trusting a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from . import files
from .errors import PenwrightError
from .models import save_model

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, model, tokenizer, state: dict, keep: int, weights: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (`weights`: a gathered FSDP state dict)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    files.remove(tmp)
    try:
        save_model(model, tokenizer, tmp, weights)
        with open(tmp / STATE_FILE, "wb") as f:  # a file object keeps a full disk's OSError visible
            torch.save(state, f)
        files.write_text(tmp / MANIFEST, json.dumps({"step": step, "files": _describe(tmp)}, indent=1))
        files.fsync_tree(tmp)
        if final.exists():  # a stale copy of the same step (from a run that was resumed earlier)
            _discard(final)
        os.rename(tmp, final)
        files.fsync_dir(root)
    except Exception as e:
        if not files.disk_full(e):
            raise
        previous = next(iter(complete(run_dir)), None)
        raise PenwrightError(
            f"disk full while saving checkpoint {final}: free space on that disk (or keep fewer with "
            f"--keep-checkpoints 1), then continue with --resume; "
            + (f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists")
        ) from None
    finally:
        files.remove(tmp)
    _prune(root, keep)
    return final


def publish_model(run_dir: Path, model, tokenizer, weights: dict | None = None) -> None:
    """Write the run dir's own HF model so that no reader ever sees a half-written file.

    The files are written and flushed in a hidden folder, then each moves into place with one
    rename; the weights go last. A crash before then leaves the previous files, or none.
    """
    run_dir = Path(run_dir)
    _remove_stale(run_dir, ".tmp-model-*")
    tmp = run_dir / f".tmp-model-{os.getpid()}"
    files.remove(tmp)
    try:
        save_model(model, tokenizer, tmp, weights)
        files.fsync_tree(tmp)
        for file in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):
            os.replace(file, run_dir / file.name)
        files.fsync_dir(run_dir)
    except Exception as e:
        if not files.disk_full(e):
            raise
        raise PenwrightError(f"disk full while writing the model into {run_dir}: free space on that disk, then "
                             "run the same command with --resume to finish from the last checkpoint") from None
    finally:
        files.remove(tmp)


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
    _remove_stale(checkpoint_dir(run_dir))
    for path in complete(run_dir):
        if verify(path):
            return path
        log(f"warning: skipping damaged checkpoint {path}")
    return None


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def _prune(root: Path, keep: int) -> None:
    for old in complete(root.parent)[keep:]:
        _discard(old)
    _remove_stale(root)


def _discard(path: Path) -> None:
    """Unpublish with one rename, then delete: a kill mid-delete leaves only a hidden temp folder,
    never a half-deleted step-* that looks published."""
    hidden = path.with_name(f".tmp-step-{path.name}-{os.getpid()}")
    os.rename(path, hidden)
    files.remove(hidden)


def _remove_stale(root: Path, pattern: str = ".tmp-step-*") -> None:
    """Remove temporary folders whose process (the pid ending their name) is gone."""
    for stale in root.glob(pattern):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            files.remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
