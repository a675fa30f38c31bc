"""Turning a `--model`/`--tokenizer` string into `from_pretrained` arguments.

A string is a local directory, a `.gguf` file (read through its converted, cached HF folder:
gguf_cache.py), or a Hugging Face hub id. Hub ids are looked up
in the local cache first; only then is the hub contacted, after a quick reachability check, so
an offline machine gets a clear message at once instead of a minute of retries.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import PenwrightError


@dataclass
class Source:
    name: str  # what the user wrote
    path: str  # the first argument to from_pretrained
    is_hub: bool = False


# What the hub accepts as a model id: NAME or OWNER/NAME.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve(spec: str) -> Source:
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PenwrightError(f"{spec}: no such .gguf file")
        from .gguf_cache import folder

        return Source(spec, str(folder(path)))
    if path.is_dir():
        return Source(spec, str(path))
    if path.exists():
        raise PenwrightError(f"{spec}: not a model directory or .gguf file")
    if looks_like_path(spec):
        raise PenwrightError(f"{spec}: no such folder{_close_to(path)}")
    return Source(spec, spec, is_hub=True)


def looks_like_path(spec: str) -> bool:
    """A local path, not a hub id: it starts with . / or ~, is no hub id's shape, or its first part
    is a folder here (runs/NAME when runs/ exists)."""
    return (spec.startswith((".", "/", "~")) or not HUB_ID.match(spec)
            or "/" in spec and Path(spec.split("/")[0]).is_dir())


def _close_to(path: Path) -> str:
    """"; did you mean runs/book?" when the folder holds a name close to the missing one."""
    try:
        names = [p.name for p in path.parent.iterdir() if p.is_dir() or p.suffix == ".gguf"]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def load_pretrained(loader, source: Source, **kwargs):
    """`loader.from_pretrained` for a Source, cache first for hub ids, with friendly errors."""
    if source.is_hub:
        try:
            return loader.from_pretrained(source.path, local_files_only=True, **kwargs)
        except OSError:
            _require_hub(source.name)
    try:
        return loader.from_pretrained(source.path, **kwargs)
    except OSError as e:
        if source.is_hub:
            raise PenwrightError(f"could not fetch {source.name!r} from the Hugging Face hub ({first_line(e)}); "
                                 "check the name, or pass a local model directory") from None
        raise PenwrightError(f"{source.name}: cannot load ({first_line(e)})") from None


def _require_hub(name: str) -> None:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError:
            pass
    raise PenwrightError(f"{name!r} is not in the local cache and the Hugging Face hub is unreachable (offline?): "
                         f"download it once where there is internet (`hf download {name}`), "
                         "or pass a local model directory or .gguf file")


def first_line(error: Exception) -> str:
    return str(error).strip().split("\n")[0][:200]
