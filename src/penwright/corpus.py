"""Reading a corpus (.txt, a folder, CSV, JSONL) into documents, and the train/validation split.

Knows nothing of tokenizers or torch: it turns files into `Document`s and says what it read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig
from .errors import PenwrightError

TEXT_SUFFIXES = (".txt", ".md")
MIN_DOCS_TO_SPLIT_BY_DOCUMENT = 10


@dataclass(frozen=True)
class Document:
    """One training document. With a prompt, `text` is the completion and only it is learned."""

    text: str
    label: str | None = None
    prompt: str | None = None


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    files: list[Path]
    labels: Counter = field(default_factory=Counter)
    fingerprint: str = ""  # a hash of every file's name and bytes: the token cache's key

    def stats(self) -> dict:
        docs = self.train + self.val
        return {
            "files": len(self.files),
            "documents": len(docs),
            "train_documents": len(self.train),
            "val_documents": len(self.val),
            "characters": sum(len(d.text) + len(d.prompt or "") for d in docs),
            "labels": dict(sorted(self.labels.items())),
        }


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read `cfg.data` (and `cfg.val_file`) and split it into train and validation documents."""
    if not cfg.data:
        raise PenwrightError("no corpus given: pass --data FILE_OR_FOLDER")
    hasher = hashlib.sha256()
    files, docs = read_documents(Path(cfg.data), cfg, hasher)
    if cfg.val_file:
        val_files, val = read_documents(Path(cfg.val_file), cfg, hasher)
        files += val_files
        train = docs
    else:
        train, val = split_documents(docs, cfg.val_fraction)
    if not train:
        raise PenwrightError(f"{cfg.data}: the corpus is empty (no text found)")
    labels = Counter(d.label for d in train + val if d.label is not None)
    return Corpus(train, val, files, labels, hasher.hexdigest())


def read_documents(path: Path, cfg: DataConfig, hasher=None) -> tuple[list[Path], list[Document]]:
    """All documents under `path`, and the files they came from; `hasher` sees each file's name and bytes."""
    files = corpus_files(path)
    docs: list[Document] = []
    for file in files:
        data = _read(file)
        if hasher is not None:
            hasher.update(os.fsencode(file.name) + b"\0" + len(data).to_bytes(8, "little") + data)
        docs += _parse(file, _decode(file, data, cfg.encoding), cfg)
    if hasher is not None:
        hasher.update(b"\1")
    return files, docs


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise PenwrightError(f"{file}: cannot read ({e.strerror or e})") from None


def corpus_files(path: Path) -> list[Path]:
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long, or with a NUL byte
        raise PenwrightError(f"{str(path)[:100]!r}: not a usable path ({getattr(e, 'strerror', None) or e})") from None
    if not exists:
        raise PenwrightError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise PenwrightError(f"{path}: folder holds no .txt or .md files")
        return files
    return [path]


def _decode(file: Path, data: bytes, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise PenwrightError(f"{file}: not valid {encoding} at byte {e.start}; "
                             f"pass the file's encoding, e.g. --encoding latin-1") from None
    except LookupError:
        raise PenwrightError(f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 "
                             "or latin-1") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _parse(file: Path, text: str, cfg: DataConfig) -> list[Document]:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        return _rows_to_documents(file, _csv_rows(file, text), cfg)
    if suffix == ".jsonl":
        return _rows_to_documents(file, _jsonl_rows(file, text), cfg)
    if cfg.line_by_line:
        return [Document(line.strip()) for line in text.split("\n") if line.strip()]
    return [Document(text.strip())] if text.strip() else []


def _csv_rows(file: Path, text: str) -> list[tuple[int, dict]]:
    csv.field_size_limit(sys.maxsize)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise PenwrightError(f"{file}: malformed CSV ({e})") from None


def _jsonl_rows(file: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # bad JSON, too deep, or a number too long to convert
            raise PenwrightError(f"{file}:{number}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise PenwrightError(f"{file}:{number}: each JSONL line must be an object like {{\"text\": ...}}")
        rows.append((number, row))
    return rows


def _rows_to_documents(file: Path, rows: list[tuple[int, dict]], cfg: DataConfig) -> list[Document]:
    columns = [cfg.prompt_column, cfg.completion_column] if cfg.prompt_column else [cfg.text_column]
    if cfg.label_column:
        columns.append(cfg.label_column)
    seen = {key for _, row in rows for key in row if isinstance(key, str)}
    for column in columns:
        if rows and column not in seen:
            have = ", ".join(sorted(seen)) or "none"
            raise PenwrightError(f"{file}: no column {column!r}; it has: {have} (choose one with --text-column etc.)")
    docs = []
    for line, row in rows:
        label = _cell(file, line, row, cfg.label_column) if cfg.label_column else None
        if label is not None:
            label = label.strip()
            if not label:
                label = None
            elif "|>" in label or "\n" in label:
                raise PenwrightError(f"{file}:{line}: label {label!r} must not contain '|>' or a newline")
        if cfg.prompt_column:
            prompt = _cell(file, line, row, cfg.prompt_column)
            completion = _cell(file, line, row, cfg.completion_column)
            if completion and completion.strip():
                docs.append(Document(completion, label, prompt or ""))
        else:
            text = _cell(file, line, row, cfg.text_column)
            if cfg.line_by_line and text:
                docs += [Document(part.strip(), label) for part in text.split("\n") if part.strip()]
            elif text and text.strip():
                docs.append(Document(text.strip(), label))
    return docs


def _cell(file: Path, line: int, row: dict, column: str) -> str | None:
    value = row.get(column)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise PenwrightError(f"{file}:{line}: column {column!r} holds {type(value).__name__}, expected text")


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """A deterministic split: whole documents when there are enough, else the tail of each one.

    With few documents (one long book, say) the last `val_fraction` of each document's lines is
    held out, as the Harry Potter tutorial's 90/10 split does.
    """
    if val_fraction == 0 or not docs:
        return docs, []
    if len(docs) >= MIN_DOCS_TO_SPLIT_BY_DOCUMENT:
        order = list(range(len(docs)))
        random.Random(0).shuffle(order)
        n_val = max(1, round(len(docs) * val_fraction))
        held = set(order[:n_val])
        return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])
    train, val = [], []
    for doc in docs:
        head, tail = _split_tail(doc.text, val_fraction) if doc.prompt is None else (doc.text, "")
        if head:
            train.append(Document(head, doc.label, doc.prompt))
        if tail:
            val.append(Document(tail, doc.label))
    return train, val


def _split_tail(text: str, fraction: float) -> tuple[str, str]:
    cut = int(len(text) * (1 - fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline
    else:
        space = text.rfind(" ", 0, cut)
        if space <= 0:
            return text, ""
        cut = space
    return text[:cut].strip(), text[cut:].strip()
