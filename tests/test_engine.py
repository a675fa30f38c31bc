"""penwright's own GPT-2 (gpt2.py): the same numbers and text as transformers, and no transformers import."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from penwright import PenwrightError, gpt2, load
from penwright.cli import main
from penwright.config import SampleConfig
from penwright.tokens import TextTokenizer

quiet = dict(log=lambda *_: None)
PROMPTS = ["The storm", "A quiet village where nobody ever locked a door until the night", "Her"]


@pytest.fixture(scope="module")
def engines(tiny_run):
    return {name: load(str(tiny_run), precision="fp32", engine=name, **quiet) for name in ("penwright", "hf")}


def padded(writer, prompts):
    """Token ids left-padded to one width, and the padding mask, as Writer._decode builds them."""
    ids = [[writer.tokenizer.eos_token_id] + writer.tokenizer.encode(p) for p in prompts]
    width = max(map(len, ids))
    return (torch.tensor([[0] * (width - len(r)) + r for r in ids]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]))


def test_auto_picks_penwright_for_a_run_dir_and_its_own_tokenizer(engines, tiny_run):
    writer = load(str(tiny_run), precision="fp32", **quiet)
    assert isinstance(writer.model, gpt2.GPT) and isinstance(writer.tokenizer, TextTokenizer)
    assert not isinstance(engines["hf"].model, gpt2.GPT)
    light, hf = engines["penwright"].tokenizer, engines["hf"].tokenizer
    text = "Once, in a <|genre=horror|> house, caf\u00e9 lights\n\n flickered.<|endoftext|>"
    assert light.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = light.encode(text)
    assert light.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (light.eos_token_id, light.pad_token_id, len(light)) == (hf.eos_token_id, hf.pad_token_id, len(hf))
    assert light.get_added_vocab() == hf.get_added_vocab()


def test_logits_match_transformers_for_prefill_and_20_decode_steps(engines):
    """Left-padded prompts of different lengths: per-row positions and padding mask, as HF does."""
    from penwright.generate import HFStepper

    ids, mask = padded(engines["hf"], PROMPTS)
    ours, theirs = gpt2.Stepper(engines["penwright"].model), HFStepper(engines["hf"].model, None)
    with torch.inference_mode():
        a, b = ours.first(ids, mask, 20), theirs.first(ids, mask, 20)
        assert (a - b).abs().max() < 1e-4
        for _ in range(20):
            token = b.argmax(-1, keepdim=True)
            a, b = ours.next(token), theirs.next(token)
            assert (a - b).abs().max() < 1e-4
        whole = ids[1:, -4:]  # rows without padding: the full-sequence forward
        assert (engines["penwright"].model(whole) - engines["hf"].model(whole).logits).abs().max() < 1e-4


def test_greedy_text_is_the_same_as_transformers_for_a_padded_batch(engines):
    cfg = SampleConfig(greedy=True, max_new_tokens=30, batch_size=len(PROMPTS))
    ours, theirs = (engines[name].samples(PROMPTS, cfg) for name in ("penwright", "hf"))
    assert [s.text for s in ours] == [s.text for s in theirs]
    alone = [engines["penwright"].samples([p], cfg)[0].text for p in PROMPTS]
    assert alone == [s.text for s in ours], "padding never changes a row's text"


def test_seeded_samples_repeat_and_labels_condition_through_the_light_tokenizer(engines):
    writer = engines["penwright"]
    settings = dict(seed=7, max_new_tokens=20, num_samples=3, top_k=40, top_p=0.9)
    first = writer.generate("The night", **settings)
    assert first == writer.generate("The night", **settings) and len(set(first)) > 1
    assert first != writer.generate("The night", **{**settings, "seed": 8})
    horror = dict(label="horror", seed=3, max_new_tokens=20, num_samples=2)
    assert writer.generate(None, **horror) == engines["hf"].generate(None, **horror)
    with pytest.raises(PenwrightError, match="unknown label 'western'"):
        writer.generate(None, label="western")


def greedy_tokens(writer, prompts: list[str], steps: int = 24) -> list[list[int]]:
    rows = [[] for _ in prompts]
    ids = [[writer.tokenizer.eos_token_id] + writer.tokenizer.encode(p) for p in prompts]
    for step in writer._decode(ids, SampleConfig(greedy=True, max_new_tokens=steps), writer._generator(0)):
        for row, token in step.items():
            rows[row].append(token)
    return rows


def test_int8_writes_nearly_the_same_greedy_tokens(tiny_run, engines):
    int8 = load(str(tiny_run), precision="bf16", quantize="int8", engine="penwright", **quiet)
    assert type(int8.model.h[0].attn.c_attn).__name__ == "Int8Linear"
    got, want = greedy_tokens(int8, PROMPTS), greedy_tokens(engines["penwright"], PROMPTS)
    same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, want))


def test_generate_never_imports_transformers(tiny_run):
    code = ("import sys; from penwright.cli import main; "
            f"rc = main(['generate', '--model', {str(tiny_run)!r}, '--prompt', 'The night', '--label', 'horror', "
            "'--max-new-tokens', '8', '--seed', '1']); "
            "print('transformers' in sys.modules, rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False 0", done.stdout + done.stderr
    assert lines[0].startswith("The night") and len(lines[0]) > len("The night")


def test_models_it_does_not_implement_go_to_transformers_or_get_one_line(tiny_base, tmp_path, capsys):
    model = tmp_path / "inverse-scaled"
    shutil.copytree(tiny_base, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    assert not isinstance(load(str(model), precision="fp32", **quiet).model, gpt2.GPT)
    assert main(["generate", "--model", str(model), "--engine", "penwright", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale_attn_by_inverse_layer_idx" in err[0] and "use --engine hf" in err[0], err
