"""Corpus readers, cleaning, the split, and the errors users see for bad corpora."""

import json

import pytest

from penwright.config import DataConfig
from penwright.corpus import Document, load_corpus, split_documents
from penwright.errors import PenwrightError


def corpus(path, **options):
    return load_corpus(DataConfig(data=str(path), **options))


def test_txt_file_is_one_document_split_by_its_tail(tmp_path):
    lines = [f"Line {i} of the only document." for i in range(40)]
    (tmp_path / "book.txt").write_text("\r\n".join(lines))
    c = corpus(tmp_path / "book.txt", val_fraction=0.1)
    assert len(c.train) == 1 and len(c.val) == 1
    assert c.train[0].text.startswith("Line 0 ") and c.val[0].text.endswith("Line 39 of the only document.")
    assert "\r" not in c.train[0].text
    assert c.train[0].text + "\n" + c.val[0].text == "\n".join(lines)


def test_folder_reads_txt_and_md_but_not_hidden_or_other_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.csv").write_text("text\ngamma\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "d.txt").write_text("hidden")
    c = corpus(tmp_path, val_fraction=0)
    assert sorted(d.text for d in c.train) == ["alpha", "beta"]
    assert len(c.files) == 2


def test_line_by_line_makes_each_nonempty_line_a_document(tmp_path):
    (tmp_path / "lines.txt").write_text("one\n\n  two  \nthree\n")
    read = corpus(tmp_path / "lines.txt", line_by_line=True, val_fraction=0)
    assert [d.text for d in read.train] == ["one", "two", "three"]


def test_csv_with_labels_and_stats(stories_csv):
    c = corpus(stories_csv, text_column="synopsis", label_column="genre")
    assert len(c.train) + len(c.val) == 192
    assert len(c.val) == round(192 * 0.1)
    assert c.labels == {g: 32 for g in ("horror", "romance", "scifi", "fantasy", "mystery", "comedy")}
    assert all(d.label in c.labels for d in c.train)
    assert c.stats()["documents"] == 192


def test_jsonl_prompt_completion(stories_jsonl):
    c = corpus(stories_jsonl, prompt_column="prompt", completion_column="completion", val_fraction=0)
    first = c.train[0]
    assert first.prompt.startswith("Title: ") and first.text.startswith(" ")


def test_split_is_deterministic_and_disjoint():
    docs = [Document(f"doc {i}") for i in range(50)]
    a, b = split_documents(docs, 0.2), split_documents(list(docs), 0.2)
    assert a == b
    assert len(a[1]) == 10 and not set(d.text for d in a[0]) & set(d.text for d in a[1])


def test_val_file_replaces_the_split(tmp_path, stories_txt):
    (tmp_path / "val.txt").write_text("held out text")
    c = corpus(stories_txt, val_file=str(tmp_path / "val.txt"))
    assert [d.text for d in c.val] == ["held out text"] and len(c.train) == 1


@pytest.mark.parametrize("setup, options, message", [
    (lambda p: None, {}, "no such file or folder"),
    (lambda p: p.write_text("  \n\n"), {}, "the corpus is empty"),
    (lambda p: p.write_bytes("caf\u00e9 ok".encode() + b"\xff\xfe rest"), {}, "not valid utf-8 at byte 8"),
    (lambda p: p.write_text("x"), {"encoding": "klingon"}, "unknown encoding"),
])
def test_bad_text_files(tmp_path, setup, options, message):
    path = tmp_path / "corpus.txt"
    setup(path)
    with pytest.raises(PenwrightError, match=message) as info:
        corpus(path, **options)
    assert "\n" not in str(info.value)


def test_latin1_file_reads_with_encoding(tmp_path):
    (tmp_path / "old.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    with pytest.raises(PenwrightError, match="--encoding"):
        corpus(tmp_path / "old.txt")
    assert corpus(tmp_path / "old.txt", encoding="latin-1", val_fraction=0).train[0].text == "na\u00efve caf\u00e9"


def test_missing_column_lists_the_columns(tmp_path):
    (tmp_path / "plots.csv").write_text("title,plot\nA,B\n")
    with pytest.raises(PenwrightError, match="no column 'text'; it has: plot, title"):
        corpus(tmp_path / "plots.csv")
    (tmp_path / "plots.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PenwrightError, match="no column 'genre'; it has: body"):
        corpus(tmp_path / "plots.jsonl", text_column="body", label_column="genre")


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(PenwrightError, match=r"x.jsonl:2: not valid JSON"):
        corpus(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text('["a list"]\n')
    with pytest.raises(PenwrightError, match=r"y.jsonl:1: each JSONL line must be an object"):
        corpus(tmp_path / "y.jsonl")
