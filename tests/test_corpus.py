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


# --- hard-wrapped text ------------------------------------------------------------------------------

SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee."""


def synopses() -> list[str]:
    from conftest import sample_rows

    return [r["synopsis"] for r in sample_rows()]


def wrap(paragraphs: list[str], width: int = 70) -> str:
    import textwrap

    return "\n\n".join(textwrap.fill(p, width) for p in paragraphs)


@pytest.mark.parametrize("width", [50, 70, 72, 80])
def test_a_hard_wrapped_text_gets_its_paragraphs_back(width):
    from penwright.corpus import reflow, wrap_width

    paragraphs = synopses()[:40]
    wrapped = wrap(paragraphs, width)
    assert wrap_width(wrapped) == width
    assert reflow(wrapped, width) == "\n\n".join(paragraphs)


def test_text_that_is_not_wrapped_is_left_alone():
    from penwright.corpus import wrap_width

    one_line_paragraphs = "\n\n".join(synopses()[:40])
    sentences = "\n".join(s.strip() + "." for p in synopses()[:20] for s in p.split(".") if s.strip())
    verse = "\n\n".join([SONNET] * 3)
    code = "\n".join(f"    {'x' * (i % 50)} = compute({i}, {'y' * (i % 13)})" for i in range(60))
    for text in (one_line_paragraphs, sentences, verse, code):
        assert wrap_width(text) is None, text[:200]


def test_reflow_keeps_verse_lists_code_and_tables_in_a_wrapped_book():
    from penwright.corpus import reflow, wrap_width

    prose = wrap(synopses()[:30])
    items = "- first thing to pack, the warm coat\n- second, the lamp\n1. one more\n2. and the last"
    fenced = "```\n" + "\n".join("print('" + "z" * 60 + "')" for _ in range(3)) + "\n```"
    table = "| a | b |\n| --- | --- |\n| " + "c" * 60 + " | d |\n| e | f |"
    book = "\n\n".join([prose, SONNET, items, fenced, table, "    an indented quotation that the author\n"
                        "    set apart, line by line"])
    assert wrap_width(book) == 70
    out = reflow(book, 70).split("\n\n")
    assert out[:30] == synopses()[:30]
    assert "\n\n".join(out[30:]) == "\n\n".join([SONNET, items, fenced, table, book.split("\n\n")[-1]])


def test_prepare_says_it_reflowed_and_keep_line_breaks_turns_it_off(tmp_path):
    from penwright.config import PrepareConfig
    from penwright.tokens import prepare

    (tmp_path / "book.txt").write_text(wrap(synopses()))
    (tmp_path / "notes.txt").write_text("\n\n".join(synopses()[:30]))
    settings = dict(data=str(tmp_path), init="scratch", vocab_size=400, cache_dir=str(tmp_path / "cache"))
    said = []
    joined = prepare(PrepareConfig(**settings), log=said.append)
    kept = prepare(PrepareConfig(**settings, keep_line_breaks=True), log=said.append)
    assert joined.path != kept.path, "the setting is part of the token cache's key"
    assert joined.stats["reflowed_files"] == 1 and kept.stats["reflowed_files"] == 0
    assert any(m.startswith(f"1 hard-wrapped file ({tmp_path / 'book.txt'}: lines of about 70 characters)") and
               "--keep-line-breaks" in m for m in said), said
    texts = [store.tokenizer().decode(store.tokens("train")).split("\n") for store in (joined, kept)]
    assert synopses()[50] in texts[0] and synopses()[50] not in texts[1]  # a paragraph, whole on its line
    c = load_corpus(DataConfig(data=str(tmp_path / "book.txt"), val_fraction=0, keep_line_breaks=True))
    assert c.train[0].text == wrap(synopses()) and not c.reflowed


# --- flags a corpus cannot honour -----------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("label_column", "genre"), ("prompt_column", "p"), ("text_column", "plot")])
def test_a_column_flag_on_a_plain_text_corpus_is_refused(tmp_path, flag, value):
    (tmp_path / "book.txt").write_text("Some text.\n")
    options = {flag: value, **({"completion_column": "c"} if flag == "prompt_column" else {})}
    with pytest.raises(PenwrightError, match=f"--{flag.replace('_', '-')} reads a column of a .csv, .jsonl or "
                                             f".json corpus, and {tmp_path / 'book.txt'} is plain text"):
        corpus(tmp_path / "book.txt", **options)


def test_empty_label_cells_are_counted_and_said(tmp_path):
    from penwright.config import PrepareConfig
    from penwright.tokens import prepare

    rows = "".join(f"{'horror' if i % 3 else ''},Story number {i} is told here.\n" for i in range(30))
    (tmp_path / "plots.csv").write_text("genre,text\n" + rows)
    c = corpus(tmp_path / "plots.csv", label_column="genre")
    assert c.stats()["unlabelled_documents"] == 10 and c.labels == {"horror": 20}
    assert "unlabelled_documents" not in corpus(tmp_path / "plots.csv").stats()
    said = []
    prepare(PrepareConfig(data=str(tmp_path / "plots.csv"), label_column="genre", init="scratch", vocab_size=300,
                          cache_dir=str(tmp_path / "cache")), log=said.append)
    assert "note: 10 documents of 30 have an empty 'genre' cell; they train without a label" in said
