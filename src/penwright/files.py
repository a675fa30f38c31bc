"""Atomic writes: a reader sees the old file or folder or the new one, never half of one.

Every published file goes through `replacing` (one temporary file, then a rename) and every
published folder through `staged_dir` (a hidden temporary folder, flushed, then a rename). A
temporary name ends in the writer's pid, so `remove_stale` can tell the leftovers of a killed
process from work still under way. Also the cache's home (`cache_home`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .errors import PenwrightError


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


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


@contextlib.contextmanager
def staged_dir(final: Path, what: str, hint: str, publish: Callable[[Path, Path], None] | None = None,
               shared: bool = True):
    """Yield an empty hidden folder beside `final` to fill; when the block succeeds, flush it and
    publish it with one rename to `final` (or with `publish(tmp, final)`), then flush the parent.

    `shared`: published files get the usual mode (0666 less the umask); libraries that write
    through `tempfile` leave them readable by their owner alone. A full disk anywhere becomes a
    PenwrightError saying `what` was under way and `hint` (what to do next); the temporary folder
    is removed either way.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    remove(tmp)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if shared:
            share_files(tmp)
        fsync_tree(tmp)
        (publish or os.rename)(tmp, final)
        fsync_dir(final.parent)
    except Exception as e:
        if not disk_full(e):
            raise
        raise PenwrightError(f"disk full while {what}: free space on that disk, then {hint}") from None
    finally:
        remove(tmp)


def first_wins(tmp: Path, final: Path) -> None:
    """Publish a content-keyed cache entry: if another process published `final` first, keep its
    copy (the same content); `staged_dir` removes ours."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise


def cache_home(override: str | Path | None = None) -> Path:
    """penwright's cache folder: `override` (--cache-dir), else $PENWRIGHT_CACHE, else ~/.cache/penwright."""
    return Path(override or os.environ.get("PENWRIGHT_CACHE") or Path.home() / ".cache" / "penwright").expanduser()


def share_files(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open()` would: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def remove_stale(root: Path, pattern: str, min_age: float = 0.0) -> None:
    """Remove the temporary files and folders matching `pattern` under `root` whose writer (the pid
    that ends their name) is gone and that are at least `min_age` seconds old."""
    for stale in Path(root).glob(pattern):
        pid = stale.name.rsplit("-", 1)[-1]
        try:
            old = time.time() - stale.lstat().st_mtime >= min_age
        except OSError:  # removed by someone else meanwhile
            continue
        if pid.isdigit() and old and not alive(int(pid)):
            remove(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
