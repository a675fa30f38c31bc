"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the folders, to disk before a rename publishes them."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so a rename into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from or during, is a full disk or quota.

    Libraries wrap the OSError: safetensors keeps only its text, torch.save raises a
    RuntimeError whose context is the OSError.
    """
    signs = [os.strerror(code) for code in DISK_FULL] + [f"os error {code}" for code in DISK_FULL]
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL or any(s in str(error) for s in signs):
            return True
        error = error.__cause__ or error.__context__
    return False
