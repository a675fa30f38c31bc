"""Hostile and broken input: every corpus reader and every config either accepts what it is
given or refuses it with a PenwrightError, never another exception (property-based, hypothesis).
Also: pickled weights are refused unless allowed, and remote code never runs unasked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import string
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from penwright import PenwrightError
from penwright.config import (
    DataConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PrepareConfig,
    RunsConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
)
from penwright.corpus import load_corpus

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepted_or_refused(action):
    """Run `action`; a PenwrightError is a fine answer, any other exception fails the test."""
    try:
        return action()
    except PenwrightError as e:
        assert str(e), "a refusal must say why"
        return None


@pytest.fixture(scope="module")
def scratch():
    """One folder reused by every example (hypothesis runs many per test)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def fresh(scratch: Path) -> Path:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    return scratch


# --- values -------------------------------------------------------------------------------------

names = st.text(string.ascii_letters + string.digits + "_ -=|<>é\n", max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
anything = json_values | st.binary(max_size=8) | st.tuples(st.integers()) | st.sets(st.integers(), max_size=2)
encodings = st.sampled_from(["utf-8", "latin-1", "utf-16", "utf-8-sig", "cp1252", "ascii", "idna", "rot13",
                             "base64", "no-such-codec", ""])


@st.composite
def data_options(draw, columns=None) -> dict:
    """DataConfig settings a user might pass, sensible or not."""
    label = draw(st.none() | names if columns is None else columns)
    options = {"text_column": draw(names), "label_column": label, "line_by_line": draw(st.booleans()),
               "val_fraction": draw(st.floats(0, 0.99)), "encoding": draw(encodings)}
    if draw(st.booleans()):
        options["prompt_column"], options["completion_column"] = draw(names), draw(names)
    return options


def read(path: Path, options: dict):
    """Configure, read and split the corpus (and fingerprint it, the cache key): each step may refuse."""
    def load():
        return load_corpus(DataConfig(data=str(path), **options))

    return accepted_or_refused(load)


# --- corpus readers ----------------------------------------------------------------------------

@FAST
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".md", ".csv", ".jsonl", ".tsv", ""]),
       options=data_options())
def test_any_bytes_in_any_corpus_file_are_read_or_refused(scratch, data, suffix, options):
    path = fresh(scratch) / f"corpus{suffix}"
    path.write_bytes(data)
    corpus = read(path, options)
    if corpus is not None:
        assert corpus.train and all(isinstance(d.text, str) and d.text for d in corpus.train + corpus.val)


@FAST
@given(files=st.lists(st.tuples(st.text(string.ascii_letters + "._/ ", min_size=1, max_size=12),
                                st.binary(max_size=80)), max_size=5), options=data_options())
def test_any_folder_is_read_or_refused(scratch, files, options):
    root = fresh(scratch) / "corpus"
    root.mkdir()
    for name, data in files:
        path = root / name.strip("/")
        if not path.name or path.name in (".", "..") or path.exists():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            continue  # the drawn names clash (a file where a folder must go): not a corpus question
    read(root, options)


@st.composite
def table(draw):
    """Rows of text under a random header, and options that may or may not name its columns."""
    header = draw(st.lists(names, min_size=1, max_size=4))
    cells = st.text(max_size=30) | st.sampled_from(["", " ", "\n", '"', "a,b", "<|x|>"])
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=len(header) + 1), max_size=6))
    column = st.sampled_from(header) | names
    options = draw(data_options(columns=st.none() | column))
    options["text_column"] = draw(column)
    if "prompt_column" in options:
        options["prompt_column"], options["completion_column"] = draw(column), draw(column)
    return header, rows, options


@FAST
@given(table=table())
def test_any_csv_table_is_read_or_refused(scratch, table):
    header, rows, options = table
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = fresh(scratch) / "corpus.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    read(path, {**options, "encoding": "utf-8"})


@FAST
@given(lines=st.lists(json_values | st.dictionaries(names, json_values, max_size=4), max_size=6),
       keys=st.lists(names, min_size=1, max_size=3), options=data_options())
def test_any_jsonl_lines_are_read_or_refused(scratch, lines, keys, options):
    path = fresh(scratch) / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    options = {**options, "encoding": "utf-8", "text_column": keys[0], "label_column": keys[-1]}
    read(path, options)


def test_deep_and_huge_json_values_are_refused_cleanly(scratch):
    path = fresh(scratch) / "corpus.jsonl"
    for line in ["[" * 100_000 + "]" * 100_000, '{"text": ' + "9" * 5000 + "}", "\x00"]:
        path.write_text(line)
        assert read(path, {}) is None
    path.write_text('{"text": 1e999}')
    assert read(path, {}).train[0].text == "inf"


def test_unreadable_and_odd_paths_are_refused(scratch, monkeypatch):
    root = fresh(scratch)
    (root / os.fsdecode(b"not-utf8-\xff.txt")).write_text("a file name that is not UTF-8")
    assert read(root, {}).train
    for data in [root / "missing.txt", Path("bad\x00name.txt"), Path("x" * 5000), root / "a.txt" / "b.txt"]:
        assert read(data, {}) is None

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert read(root, {}) is None


# --- config validation -------------------------------------------------------------------------

CONFIGS = [DataConfig, PrepareConfig, TrainConfig, SampleConfig, GenerateConfig, EvalConfig, ServeConfig,
           ExportConfig, RunsConfig]


@st.composite
def config_settings(draw):
    cls = draw(st.sampled_from(CONFIGS))
    chosen = draw(st.lists(st.sampled_from([f.name for f in fields(cls)]), unique=True, max_size=6))
    values = anything | st.integers(-3, 3) | st.floats(-2, 2) | st.sampled_from(
        ["tiny", "scratch", "fp32", "cpu", "auto", "r=8", "r=x", ",", "=", "gpt2", "runs/x", "a=b", "=x"])
    return cls, {name: draw(values) for name in chosen}


@settings(max_examples=600, deadline=None)
@given(config=config_settings())
def test_any_config_values_are_accepted_or_refused(config):
    cls, values = config
    accepted_or_refused(lambda: cls(**values))


# --- model weights -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pickled_model(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's model saved the old way: pytorch_model.bin only (a pickle)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("pickled") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_run).save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_pickled_weights_are_refused_without_allow_pickle(pickled_model):
    from penwright.models import load_model

    with pytest.raises(PenwrightError, match=r"only pickled weights .* pass --allow-pickle if you trust them"):
        load_model(str(pickled_model))
    assert load_model(str(pickled_model), allow_pickle=True).config.model_type == "gpt2"


def test_generate_refuses_pickled_weights_unless_allowed(pickled_model, capsys):
    from penwright.cli import main

    assert main(["generate", "--model", str(pickled_model), "--max-new-tokens", "3", "--seed", "1"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["generate", "--model", str(pickled_model), "--max-new-tokens", "3", "--seed", "1",
                 "--allow-pickle"]) == 0


def test_remote_code_never_runs_unasked(tiny_run, tmp_path):
    """A model folder whose config points at its own Python code: the code is not imported."""
    from penwright.models import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import GPT2LMHeadModel as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    accepted_or_refused(lambda: load_model(str(folder)))
    assert not marker.exists()
    assert TrainConfig().trust_remote_code is False and PrepareConfig().trust_remote_code is False
