"""Sampling: reproducible seeds, labels, stop strings, trimming, streaming, long prompts."""

import pytest
import torch

from penwright import PenwrightError, load
from penwright.config import SampleConfig
from penwright.generate import draw, finish, nucleus, pick_tokens, top_p_floor


@pytest.fixture(scope="module")
def writer(tiny_run):
    return load(str(tiny_run), precision="fp32", log=lambda *_: None)


def test_same_seed_same_text_and_other_seed_other_text(writer):
    a = writer.generate("The night", num_samples=2, seed=11, max_new_tokens=24)
    assert a == writer.generate("The night", num_samples=2, seed=11, max_new_tokens=24)
    assert a != writer.generate("The night", num_samples=2, seed=12, max_new_tokens=24)
    assert len(a) == 2 and a[0] != a[1]


def test_stream_writes_the_same_text_as_batch(writer):
    settings = dict(seed=5, max_new_tokens=30, stop=["."])
    pieces = list(writer.stream("A storm", **settings))
    assert len(pieces) > 1
    assert "".join(pieces) == writer.generate("A storm", **settings)[0]
    assert "." not in "".join(pieces)


def test_labels_condition_generation_and_unknown_label_is_refused(writer):
    assert set(writer.labels) == {"horror", "romance", "scifi", "fantasy", "mystery", "comedy"}
    ids, _ = writer.prompt_ids("Hello", SampleConfig(label="horror"))
    assert [ids[1]] == writer.tokenizer.encode("<|genre=horror|>"), "one control token, never split"
    first = {}
    with torch.inference_mode():
        for g in ("horror", "comedy"):
            first[g] = writer._stepper(1).first([writer.prompt_ids(None, SampleConfig(label=g))[0]], 1)[0]
    assert not torch.allclose(first["horror"], first["comedy"]), "the label changes what comes next"
    assert len(writer.generate(None, label="horror", seed=3, max_new_tokens=20)[0]) > 0
    with pytest.raises(PenwrightError, match="unknown label 'western'; this model knows: comedy, fantasy"):
        writer.generate("x", label="western")


def test_long_prompt_keeps_its_last_tokens_with_a_warning(tiny_run):
    warnings = []
    writer = load(str(tiny_run), precision="fp32", log=warnings.append)
    prompt = "word " * 400
    ids, budget = writer.prompt_ids(prompt, SampleConfig(max_new_tokens=50))
    assert len(ids) + budget <= writer.context and budget == 50
    assert "keeping its last" in warnings[0]
    assert len(writer.generate(prompt, max_new_tokens=50, seed=1)) == 1


def test_pick_tokens_settings():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    seen = torch.full((1, 1), -1)
    assert pick_tokens(logits, SampleConfig(greedy=True), g, seen).item() == 1
    assert {pick_tokens(logits, SampleConfig(top_k=1), g, seen).item() for _ in range(20)} == {1}
    assert {pick_tokens(logits, SampleConfig(top_p=0.3), g, seen).item() for _ in range(20)} == {1}
    assert {pick_tokens(logits, SampleConfig(top_k=2), g, seen).item() for _ in range(50)} == {1, 2}
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 0.0, 0.0, 3.9]])  # each row keeps its own likeliest ids
    picks = [pick_tokens(rows, SampleConfig(top_k=2, top_p=0.99), g, seen.expand(2, 1)).tolist() for _ in range(60)]
    assert {a for a, _ in picks} == {1, 2} and {b for _, b in picks} == {0, 3}
    penalised = pick_tokens(logits, SampleConfig(greedy=True, repetition_penalty=10.0), g, torch.tensor([[1]]))
    assert penalised.item() == 2


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0])  # untrained-flat, broad, peaked (a trained model's)
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_keeps_the_set_a_full_sort_keeps(spread, top_p):
    logits = torch.randn(3, 50257, generator=torch.Generator().manual_seed(7)) * spread
    ordered, order = logits.sort(descending=True)
    probs = ordered.softmax(-1)
    wanted = [set(row[keep].tolist()) for row, keep in zip(order, probs.cumsum(-1) - probs <= top_p)]
    kept, ids = nucleus(logits, None, top_p)
    ids = torch.arange(logits.size(-1)).expand_as(kept) if ids is None else ids
    got = [set(row[keep].tolist()) for row, keep in zip(ids, kept > float("-inf"))]
    for want, have in zip(wanted, got):  # the same set, but for float rounding at its edge
        assert len(want ^ have) <= max(1, len(want) // 10_000), (len(want), len(have))


def test_top_p_floor_is_where_a_full_sort_passes_top_p_even_with_a_far_tail():
    logits = torch.randn(2, 50257, generator=torch.Generator().manual_seed(3))
    logits[:, ::2] -= 50  # half the vocabulary far below the rest: past FLOOR_SPAN, all in the lowest bin
    logp = logits.log_softmax(-1)
    ordered = logp.sort(-1, descending=True).values
    for top_p in (0.5, 0.9, 0.999):
        passes = (ordered.double().exp().cumsum(-1) <= top_p).sum(-1, keepdim=True)  # first index past top_p
        assert torch.equal(top_p_floor(logp, logp.exp(), top_p), ordered.gather(1, passes))
    # probabilities holding less than top_p in all (rounding, at top_p near 1): every token is kept
    assert torch.equal(top_p_floor(logp, logp.exp() / 2, 0.9), logp.amin(-1, keepdim=True))


def test_draw_samples_in_proportion():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(4000, -1)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)).flatten(), minlength=4) / 4000
    assert counts[1] == 0 and torch.allclose(counts, probs[0], atol=0.03)


def test_finish_cuts_at_stop_and_trims_to_sentence():
    assert finish("Hello there. More text", SampleConfig(trim_to_sentence=True)) == ("Hello there.", False)
    assert finish('He said "Go!" and then', SampleConfig(trim_to_sentence=True))[0] == 'He said "Go!"'
    assert finish("one\ntwo END three", SampleConfig(stop=["END"])) == ("one\ntwo ", True)
    assert finish("partial EN", SampleConfig(stop=["END"]), final=False) == ("partial ", False)


def test_scratch_runs_write_within_the_positions_they_learned(writer, tiny_run):
    assert writer.context == 64 < writer.model.config.n_positions  # tiny_run trained on 64-token blocks


def test_a_run_still_training_points_to_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000100").mkdir(parents=True)
    (run / "penwright.json").write_text('{"config": {}}')
    with pytest.raises(PenwrightError, match="training has not finished.*checkpoints/step-00000100"):
        load(str(run))


def test_more_new_tokens_than_the_context_holds_is_said_once(tiny_run):
    said = []
    writer = load(str(tiny_run), precision="fp32", log=said.append)  # trained from scratch at block 64
    samples = writer.samples([None], SampleConfig(max_new_tokens=100_000, num_samples=3, batch_size=1,
                                                  seed=1))
    assert said == ["warning: --max-new-tokens 100000 is more than the model's 64-token context holds; "
                    "writing at most 62 new tokens"]
    assert all(s.new_tokens <= 62 for s in samples)
    writer.generate("The night", max_new_tokens=10)
    assert len(said) == 1, "nothing to say when it fits"
