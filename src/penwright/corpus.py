"""Reading a corpus (.txt, a folder, CSV, JSONL, JSON) into documents or conversations, and the split.

Knows nothing of tokenizers or torch: it turns files into `Document`s, or `Conversation`s for the
three shapes chat data comes in (OpenAI `messages`, ShareGPT `conversations`, Alpaca), and says
what it read. A malformed row is named by file and line; `--max-bad-rows` of them are skipped.
Plain-text files that were hard-wrapped at a fixed width (Project Gutenberg's books are, at about
70 characters) have the lines of each paragraph joined (`reflow`), so that a model learns the
author's paragraphs rather than the wrapper's line breaks; `--keep-line-breaks` keeps them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .config import DataConfig
from .errors import PenwrightError

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".csv", ".jsonl", ".json")  # corpora of rows; every other file is plain text
MIN_DOCS_TO_SPLIT_BY_DOCUMENT = 10
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclass(frozen=True)
class Document:
    """One training document. With a prompt, `text` is the completion and only it is learned."""

    text: str
    label: str | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class Turn:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class Conversation:
    """One conversation, whichever format it came in. By default only the assistant's turns are learned."""

    turns: tuple[Turn, ...]
    source: str = field(default="", compare=False)  # "file:line", for messages about this conversation
    label: ClassVar[None] = None  # a conversation has no label or prompt of its own: it reads as a Document
    prompt: ClassVar[None] = None

    @property
    def text(self) -> str:
        return "\n".join(turn.content for turn in self.turns)

    def messages(self) -> list[dict]:
        return [{"role": turn.role, "content": turn.content} for turn in self.turns]


class BadRows:
    """Malformed rows: each one is skipped and counted, until there are more than `limit`; then the
    one too many is the error, named by its file and line."""

    def __init__(self, limit: int, seen: int = 0):
        self.limit, self.seen = limit, seen

    def add(self, where: str, reason: str) -> None:
        self.seen += 1
        if self.seen > self.limit:
            hint = (f"; {self.limit} malformed rows before it were skipped (--max-bad-rows {self.limit})"
                    if self.limit else "; fix it, or skip such rows with --max-bad-rows N")
            raise PenwrightError(f"{where}: {reason}{hint}")


class Malformed(Exception):
    """A row that cannot be read; `_rows_to_documents` reports it through `BadRows`."""


@dataclass
class Corpus:
    train: list[Document] | list[Conversation]
    val: list[Document] | list[Conversation]
    files: list[Path]
    labels: Counter = field(default_factory=Counter)
    fingerprint: str = ""  # a hash of every file's name and bytes: the token cache's key
    skipped: int = 0  # malformed rows left out (--max-bad-rows)
    reflowed: dict[Path, int] = field(default_factory=dict)  # hard-wrapped file -> the width it was wrapped at
    labelled: bool = False  # read with --label-column

    @property
    def conversations(self) -> bool:
        return any(isinstance(d, Conversation) for d in self.train + self.val)

    def stats(self) -> dict:
        docs = self.train + self.val
        unlabelled = {"unlabelled_documents": sum(d.label is None for d in docs)} if self.labelled else {}
        stats = {
            "files": len(self.files),
            "reflowed_files": len(self.reflowed),
            "documents": len(docs),
            "train_documents": len(self.train),
            "val_documents": len(self.val),
            "characters": sum(len(d.text) + len(d.prompt or "") for d in docs),
            "labels": dict(sorted(self.labels.items())),
            **unlabelled,  # rows whose label cell is empty: they train without a control token
        }
        if self.conversations:
            stats.update(conversations=len(docs), turns=sum(len(d.turns) for d in docs))
        return {**stats, "skipped_rows": self.skipped} if self.skipped else stats


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read `cfg.data` (and `cfg.val_file`) and split it into train and validation documents."""
    if not cfg.data:
        raise PenwrightError("no corpus given: pass --data FILE_OR_FOLDER")
    hasher, bad, reflowed = hashlib.sha256(), BadRows(cfg.max_bad_rows), {}
    files, docs = read_documents(Path(cfg.data), cfg, hasher, bad, reflowed)
    if cfg.val_file:
        val_files, val = read_documents(Path(cfg.val_file), cfg, hasher, bad, reflowed)
        files += val_files
        train = docs
    else:
        train, val = split_documents(docs, cfg.val_fraction)
    if not train:
        raise PenwrightError(f"{cfg.data}: the corpus is empty (no text found)")
    if len({isinstance(d, Conversation) for d in train + val}) > 1:
        raise PenwrightError(f"{cfg.data} and {cfg.val_file}: one holds conversations and the other plain "
                             "text; give both in the same form")
    labels = Counter(d.label for d in train + val if d.label is not None)
    return Corpus(train, val, files, labels, hasher.hexdigest(), bad.seen, reflowed, cfg.label_column is not None)


def read_documents(path: Path, cfg: DataConfig, hasher=None, bad: BadRows | None = None,
                   reflowed: dict | None = None) -> tuple[list[Path], list[Document] | list[Conversation]]:
    """All documents under `path`, and the files they came from; `hasher` sees each file's name and bytes,
    `reflowed` gets each hard-wrapped text file whose lines were joined, with the width it was wrapped at."""
    files = corpus_files(path)
    bad = bad or BadRows(cfg.max_bad_rows)
    docs: list[Document] = []
    for file in files:
        data = _read(file)
        if hasher is not None:
            hasher.update(os.fsencode(file.name) + b"\0" + len(data).to_bytes(8, "little") + data)
        text = _decode(file, data, cfg.encoding)
        if _is_text(file) and not (cfg.keep_line_breaks or cfg.line_by_line) and (width := wrap_width(text)):
            text = reflow(text, width)
            if reflowed is not None:
                reflowed[file] = width
        docs += _parse(file, text, cfg, bad)
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


# --- hard-wrapped text ----------------------------------------------------------------------------

WRAP_WIDTHS = (40, 100)  # the widths text is hard-wrapped at (Gutenberg: about 70; email: 72-80)
MIN_WRAPPED_LINES = 20  # fewer lines than this say nothing about wrapping
# A line that starts something of its own, whose break before it is the author's: indented (a new
# paragraph, verse, code, a quotation), a list item, a table row, a heading, a quote or a fence.
OWN_LINE = re.compile(r"^(\s|[-*+\u2022]\s|\d{1,2}[.)]\s|[A-Za-z][.)]\s|[|#>]|```|~~~)")


def wrap_width(text: str) -> int | None:
    """The width `text` was hard-wrapped at, or None when its lines show no wrapping.

    A wrapper breaks a line only where the next word would not fit, so nearly every line inside a
    paragraph ends within a word of the width. Paragraphs written on one line each, verse, code and
    lists do not look like that: their lines end where the author ended them.
    """
    lines = text.split("\n")
    lengths = sorted(len(line.rstrip()) for line in lines if line.strip())
    if len(lengths) < MIN_WRAPPED_LINES:
        return None
    width = lengths[int(0.95 * (len(lengths) - 1))]
    inner = [(line, after) for line, after in zip(lines, lines[1:]) if line.strip() and after.strip()]
    if not WRAP_WIDTHS[0] <= width <= WRAP_WIDTHS[1] or len(inner) < len(lengths) / 2:
        return None  # lines too short or too long for wrapping, or mostly one-line paragraphs
    broken = sum(_broken_by_wrapper(line, after, width) for line, after in inner)
    return width if broken >= 0.6 * len(inner) else None


def _broken_by_wrapper(line: str, after: str, width: int) -> bool:
    """The next line's first word would have overflowed this one: the wrapper, not the author, broke it."""
    return len(line.rstrip()) + 1 + len(after.split()[0]) > width and not OWN_LINE.match(after)


def reflow(text: str, width: int) -> str:
    """Join the lines of each paragraph that a wrapper at `width` broke. Blank-line paragraph breaks
    stay, and so do the lines of verse, lists, tables and code (fenced code is left whole)."""
    lines = text.split("\n")
    out, fenced = lines[:1], lines[0].startswith(("```", "~~~"))
    for line, after in zip(lines, lines[1:]):
        if after.startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.strip() and after.strip() and _broken_by_wrapper(line, after, width):
            joined = out[-1].rstrip()
            # A wrapper may break after a hyphen ("well-" / "known"): join those without a space.
            out[-1] = joined + ("" if re.search(r"\S-$", joined) else " ") + after.strip()
        else:
            out.append(after)
    return "\n".join(out)


def _is_text(file: Path) -> bool:
    return file.suffix.lower() not in ROW_SUFFIXES


def _parse(file: Path, text: str, cfg: DataConfig, bad: BadRows) -> list[Document] | list[Conversation]:
    suffix = file.suffix.lower()
    rows = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}.get(suffix)
    if rows is not None:
        return _rows_to_documents(file, rows(file, text, bad), cfg, bad)
    columns = {"label_column": cfg.label_column, "prompt_column": cfg.prompt_column,
               "text_column": None if cfg.text_column == "text" else cfg.text_column}
    if given := next((name for name, value in columns.items() if value is not None), None):
        raise PenwrightError(f"--{given.replace('_', '-')} reads a column of a .csv, .jsonl or .json corpus, and "
                             f"{file} is plain text: put each text (and its label) in a row of a CSV file, "
                             "or drop the flag")
    if cfg.line_by_line:
        return [Document(line.strip()) for line in text.split("\n") if line.strip()]
    return [Document(text.strip())] if text.strip() else []


def _csv_rows(file: Path, text: str, bad: BadRows) -> list[tuple[int, dict]]:
    csv.field_size_limit(sys.maxsize)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise PenwrightError(f"{file}: malformed CSV ({e})") from None


def _jsonl_rows(file: Path, text: str, bad: BadRows) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # bad JSON, too deep, or a number too long to convert
            bad.add(f"{file}:{number}", f"not valid JSON ({getattr(e, 'msg', e)})")
            continue
        if not isinstance(row, dict):
            bad.add(f"{file}:{number}", "each JSONL line must be an object like {\"text\": ...}")
            continue
        rows.append((number, row))
    return rows


def _json_rows(file: Path, text: str, bad: BadRows) -> list[tuple[int, dict]]:
    """A JSON array of row objects (Alpaca's own files are one), each with the line it starts on."""
    decoder, rows = json.JSONDecoder(), []
    at = _skip_space(text, 0)
    if not text.startswith("[", at):
        raise PenwrightError(f"{file}: a .json corpus must be a list of objects, one per row (or use .jsonl)")
    at = _skip_space(text, at + 1)
    while not text.startswith("]", at):
        line = text.count("\n", 0, at) + 1
        try:
            row, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError) as e:  # the rest of the file cannot be read past this point
            raise PenwrightError(f"{file}:{line}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            bad.add(f"{file}:{line}", "each row must be an object like {\"text\": ...}")
        at = _skip_space(text, at)
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
        elif not text.startswith("]", at):
            line = text.count("\n", 0, at) + 1
            raise PenwrightError(f"{file}:{line}: not valid JSON (expected ',' or ']')")
    return rows


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\n":
        at += 1
    return at


def _rows_to_documents(file: Path, rows: list[tuple[int, dict]], cfg: DataConfig,
                       bad: BadRows) -> list[Document] | list[Conversation]:
    seen = {key for _, row in rows for key in row if isinstance(key, str)}
    shape = row_format(seen, cfg)
    if shape != "text":
        return _rows_to_conversations(file, rows, shape, seen, bad)
    columns = [cfg.prompt_column, cfg.completion_column] if cfg.prompt_column else [cfg.text_column]
    if cfg.label_column:
        columns.append(cfg.label_column)
    _require(file, rows, seen, columns, "choose one with --text-column etc.")
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


def _require(file: Path, rows: list, seen: set, columns: list[str], hint: str) -> None:
    for column in columns:
        if rows and column not in seen:
            have = ", ".join(sorted(seen)) or "none"
            raise PenwrightError(f"{file}: no column {column!r}; it has: {have} ({hint})")


# --- conversations ----------------------------------------------------------------------------

FORMAT_COLUMNS = {"messages": ["messages"], "sharegpt": ["conversations"],
                  "alpaca": ["instruction", "output"]}  # what each format's rows must hold


def row_format(columns: set, cfg: DataConfig) -> str:
    """`--format`, or for auto what the columns say: messages, conversations, instruction + output, else text."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.prompt_column is None:
        for shape, needs in FORMAT_COLUMNS.items():
            if set(needs) <= columns:
                return shape
    return "text"


def _rows_to_conversations(file: Path, rows: list[tuple[int, dict]], shape: str, seen: set,
                           bad: BadRows) -> list[Conversation]:
    _require(file, rows, seen, FORMAT_COLUMNS[shape], f"--format {shape} needs it")
    read = {"messages": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}[shape]
    conversations = []
    for line, row in rows:
        try:
            if missing := [column for column in FORMAT_COLUMNS[shape] if column not in row]:
                raise Malformed(f"no {missing[0]!r}, as --format {shape} needs")
            turns = read(row)
            if not any(turn.role == "assistant" for turn in turns):
                raise Malformed("no assistant turn, so nothing to learn from it")
        except Malformed as e:
            bad.add(f"{file}:{line}", str(e))
            continue
        conversations.append(Conversation(turns, f"{file}:{line}"))
    return conversations


def _openai(row: dict) -> tuple[Turn, ...]:
    return _turns(row["messages"], "messages", "role", "content", {role: role for role in ROLES})


def _sharegpt(row: dict) -> tuple[Turn, ...]:
    return _turns(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)


def _alpaca(row: dict) -> tuple[Turn, ...]:
    """Alpaca's instruction (and its optional input after a blank line) asked by the user, the output answered."""
    instruction, extra, output = (_text(row.get(key), key) for key in ("instruction", "input", "output"))
    if not instruction.strip() or not output.strip():
        raise Malformed(f"empty {'instruction' if not instruction.strip() else 'output'}")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Turn("user", user), Turn("assistant", output)


def _text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Malformed(f"{name!r} holds {type(value).__name__}, expected text")
    return value


def _turns(value, column: str, role_key: str, text_key: str, roles: dict[str, str]) -> tuple[Turn, ...]:
    """The turns of a list of {role, content}-like objects; a CSV cell holds that list as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise Malformed(f"{column!r} is text that is not a JSON list") from None
    if not isinstance(value, list):
        raise Malformed(f"{column!r} must be a list of {{{role_key!r}, {text_key!r}}} objects, "
                        f"not {type(value).__name__}")
    turns = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise Malformed(f"{column}[{number}] is {type(message).__name__}, not an object")
        role, content = message.get(role_key), message.get(text_key)
        if not isinstance(role, str) or role not in roles:
            raise Malformed(f"{column}[{number}] has {role_key} {role!r}; known ones are: {', '.join(roles)}")
        if not isinstance(content, str) or not content.strip():
            raise Malformed(f"{column}[{number}] ({role}) has no {text_key}: it must be non-empty text")
        turns.append(Turn(roles[role], content))
    return tuple(turns)


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
    held out, as the Harry Potter tutorial's 90/10 split does. Conversations are held out whole.
    """
    if val_fraction == 0 or not docs:
        return docs, []
    whole = isinstance(docs[0], Conversation)  # a conversation is never cut
    if len(docs) >= MIN_DOCS_TO_SPLIT_BY_DOCUMENT or whole:
        order = list(range(len(docs)))
        random.Random(0).shuffle(order)
        n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
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
