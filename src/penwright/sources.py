"""Turning a `--model`/`--tokenizer` string into `from_pretrained` arguments.

A string is a local directory, a `.gguf` file, or a Hugging Face hub id. Hub ids are looked up
in the local cache first; only then is the hub contacted, after a quick reachability check, so
an offline machine gets a clear message at once instead of a minute of retries.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import PenwrightError


@dataclass
class Source:
    name: str  # what the user wrote
    path: str  # the first argument to from_pretrained
    kwargs: dict = field(default_factory=dict)
    is_hub: bool = False


def resolve(spec: str) -> Source:
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PenwrightError(f"{spec}: no such .gguf file")
        return Source(spec, str(path.parent), {"gguf_file": path.name})
    if path.is_dir():
        return Source(spec, str(path))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PenwrightError(f"{spec}: not a model directory or .gguf file")
    return Source(spec, spec, is_hub=True)


def load_pretrained(loader, source: Source, **kwargs):
    """`loader.from_pretrained` for a Source, cache first for hub ids, with friendly errors."""
    kwargs = {**source.kwargs, **kwargs}
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
