"""penwright's own engine (engine.py, gpt2.py, llama.py): the same numbers and text as transformers
for each family, and no transformers import.

GPT-2 is the tiny run trained once per session; the Llama family are tiny random models built here
with transformers' own config classes and saved with save_pretrained, one per feature: grouped-query
attention with a tied head, Qwen2's biases and sliding window, Mistral's sliding window, and each
rope_scaling type the engine implements.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from penwright import PenwrightError, load
from penwright.cli import main
from penwright.config import SampleConfig
from penwright.engine import Cache, Model, Stepper, last
from penwright.generate import HFStepper, engine_family
from penwright.tokens import TextTokenizer

quiet = dict(log=lambda *_: None)
PROMPTS = ["The storm", "A quiet village where nobody ever locked a door until the night", "Her"]
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMAS = {  # name -> transformers config class, settings beyond SHAPE
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "mistral": ("MistralConfig", dict(sliding_window=6)),
    "rope-linear": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0))),
    # dynamic NTK stretches past 16 positions, which the 30-token tests cross
    "rope-dynamic": ("LlamaConfig", dict(max_position_embeddings=16,
                                         rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4))),
    "rope-llama3": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8, rope_theta=1e4))),
    "rope-yarn": ("LlamaConfig", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=1e4))),
}
FAMILIES = ["gpt2", *LLAMAS]


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory, tiny_base):
    """Each Llama-family model of LLAMAS as an HF folder, with tiny_base's tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_base)
    root, dirs = tmp_path_factory.mktemp("llamas"), {}
    for name, (config_class, settings) in LLAMAS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                                     bos_token_id=tokenizer.eos_token_id, **{**SHAPE, **settings})
        dirs[name] = root / name
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def folders(tiny_run, llama_dirs):
    return {"gpt2": tiny_run, **llama_dirs}


WRITERS = {}


def writer(folders, name: str, engine: str):
    """One writer per model and engine for the whole session (loading costs more than the tests)."""
    if (name, engine) not in WRITERS:
        WRITERS[name, engine] = load(str(folders[name]), precision="fp32", engine=engine, **quiet)
    return WRITERS[name, engine]


def prompts_for(name: str) -> list[str]:
    # transformers stretches dynamic NTK by the furthest row of a batch, penwright by each row's own
    # furthest position (so a row writes the same alone as in a batch): compare one row there.
    return PROMPTS[1:2] if name == "rope-dynamic" else PROMPTS


def encoded(w, prompts):
    return [[w.tokenizer.eos_token_id] + w.tokenizer.encode(p) for p in prompts]


@pytest.mark.parametrize("name", FAMILIES)
def test_auto_picks_penwright_and_its_light_tokenizer_matches_transformers(folders, name):
    ours, hf = writer(folders, name, "auto"), writer(folders, name, "hf")
    assert isinstance(ours.model, Model) and isinstance(ours.tokenizer, TextTokenizer)
    assert not isinstance(hf.model, Model)
    light, theirs = ours.tokenizer, hf.tokenizer
    text = "Once, in a <|genre=horror|> house, caf\u00e9 lights\n\n flickered.<|endoftext|>"
    assert light.encode(text) == theirs.encode(text, add_special_tokens=False)
    ids = light.encode(text)
    assert light.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (light.eos_token_id, light.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert len(light) == len(theirs)
    assert light.get_added_vocab() == theirs.get_added_vocab()
    assert ours.context == hf.context


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_for_prefill_and_20_decode_steps(folders, name):
    """Prompts of different lengths: transformers left-pads them, penwright gives each its own slot."""
    ours, hf = writer(folders, name, "penwright"), writer(folders, name, "hf")
    prompts = encoded(hf, prompts_for(name))
    a_step, b_step = Stepper(ours.model), HFStepper(hf.model, None)
    with torch.inference_mode():
        a, b = a_step.first(prompts, 20), b_step.first(prompts, 20)
        assert (a - b).abs().max() < 1e-4
        for _ in range(20):
            token = b.argmax(-1, keepdim=True)
            a, b = a_step.next(token), b_step.next(token)
            assert (a - b).abs().max() < 1e-4
        whole = torch.tensor([p[:2] for p in prompts])  # the cacheless forward on whole rows
        assert (ours.model(whole) - hf.model(whole).logits).abs().max() < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_text_is_transformers_and_a_row_writes_the_same_alone(folders, name):
    cfg = SampleConfig(greedy=True, max_new_tokens=30, batch_size=len(PROMPTS))
    ours = writer(folders, name, "penwright")
    theirs = writer(folders, name, "hf").samples(prompts_for(name), cfg)
    assert [s.text for s in ours.samples(prompts_for(name), cfg)] == [s.text for s in theirs]
    batch = [s.text for s in ours.samples(PROMPTS, cfg)]
    assert [ours.samples([p], cfg)[0].text for p in PROMPTS] == batch, "the batch never changes a row's text"


def test_seeded_samples_repeat_and_labels_condition_through_the_light_tokenizer(folders):
    w = writer(folders, "gpt2", "penwright")
    settings = dict(seed=7, max_new_tokens=20, num_samples=3, top_k=40, top_p=0.9)
    first = w.generate("The night", **settings)
    assert first == w.generate("The night", **settings) and len(set(first)) > 1
    assert first != w.generate("The night", **{**settings, "seed": 8})
    horror = dict(label="horror", seed=3, max_new_tokens=20, num_samples=2)
    assert w.generate(None, **horror) == writer(folders, "gpt2", "hf").generate(None, **horror)
    with pytest.raises(PenwrightError, match="unknown label 'western'"):
        w.generate(None, label="western")


def greedy_tokens(w, prompts: list[str], steps: int = 24) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for step in w._decode(encoded(w, prompts), SampleConfig(greedy=True, max_new_tokens=steps), w.generator(0)):
        for row, token in step.items():
            rows[row].append(token)
    return rows


def test_int8_writes_nearly_the_greedy_tokens_of_fp32(folders, cpu_path):
    int8 = load(str(folders["gpt2"]), precision="auto", quantize="int8", engine="penwright", **quiet)
    assert type(int8.model.layers[0].attn.c_attn).__name__ == "Int8Linear"
    got, want = greedy_tokens(int8, PROMPTS), greedy_tokens(writer(folders, "gpt2", "penwright"), PROMPTS)
    same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, want))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_int8_llama_logits_stay_close_to_fp32(folders, name):
    """Random weights give near-flat scores, where any rounding flips greedy tokens: compare logits."""
    int8 = load(str(folders[name]), precision="fp32", quantize="int8", engine="penwright", **quiet)
    assert {type(int8.model.layers[0].self_attn.qkv).__name__, type(int8.model.lm_head).__name__} == {"Int8Linear"}
    prompts = encoded(int8, PROMPTS)
    with torch.inference_mode():
        a = Stepper(int8.model).first(prompts, 1)
        b = Stepper(writer(folders, name, "penwright").model).first(prompts, 1)
    assert (a - b).norm() < 0.02 * b.norm()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_never_imports_transformers(folders, name):
    code = ("import sys; from penwright.cli import main; "
            f"rc = main(['generate', '--model', {str(folders[name])!r}, '--prompt', 'The night', "
            "'--max-new-tokens', '8', '--seed', '1']); "
            "print('transformers' in sys.modules, rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False 0", done.stdout + done.stderr
    assert lines[0].startswith("The night") and len(lines[0]) > len("The night")


def edited(source, tmp_path, **changes):
    """A copy of the model folder `source` with `changes` made to its config.json."""
    model = tmp_path / source.name
    shutil.copytree(source, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


@pytest.mark.parametrize("name, changes, reason", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is not implemented"),
    ("llama", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, long_factor=[2.0] * 8,
                                        short_factor=[1.0] * 8, original_max_position_embeddings=1024)),
     "rope_type 'longrope'"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu' is not implemented"),
    ("llama", dict(model_type="gemma"), "model_type 'gemma' is not one it runs (gpt2, llama, mistral, qwen2)"),
])
def test_models_it_does_not_implement_get_transformers_or_one_line(folders, tmp_path, capsys, name, changes, reason):
    model = edited(folders[name], tmp_path, **changes)
    assert reason.split(" (")[0] in engine_family(str(model))[1]
    if "model_type" not in changes:  # transformers still runs the others
        assert not isinstance(load(str(model), precision="fp32", **quiet).model, Model)
    assert main(["generate", "--model", str(model), "--engine", "penwright", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "use --engine hf" in err[0], err


def test_sharded_safetensors_load_into_the_engine(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(folders["qwen2"]).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["qwen2"] / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    w = load(str(sharded), precision="fp32", **quiet)
    assert isinstance(w.model, Model)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(w.model(ids), writer(folders, "qwen2", "penwright").model(ids))


# --- the cache's primitives, for a scheduler (continuous batching) ----------------------------------

def alone(model, ids: list[int], more: list[int]) -> list[torch.Tensor]:
    """The logits after prefilling `ids` into a cache of its own, then after each token of `more`."""
    cache = Cache(model, 1, 64)
    slot = cache.reserve()
    out = [last(cache.prefill(slot, ids))]
    out += [cache.decode([slot], torch.tensor([t]))[0] for t in more]
    return out


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_rows_at_different_lengths_decode_together_as_they_would_alone(folders, name):
    """Chunked prefill (across Mistral's 6-token window), rows in scattered slots, one forked from
    another, then decode steps over all of them at once, in any order."""
    model = writer(folders, name, "penwright").model
    prompts = {0: list(range(5, 19)), 2: [3, 4], 3: list(range(20, 27))}  # slot -> prompt
    follow = {slot: [40 + 4 * slot + i for i in range(4)] for slot in range(4)}  # tokens fed after it
    cache = Cache(model, 4, 64)
    assert [cache.reserve() for _ in range(4)] == [0, 1, 2, 3]
    cache.free(1)
    with torch.inference_mode():
        chunks = list(cache.prefill(0, prompts[0], chunk=5))
        assert [c is None for c in chunks] == [True, True, False]  # 14 tokens in chunks of 5
        got = {0: [chunks[-1]], 2: [last(cache.prefill(2, prompts[2]))],
               3: [last(cache.prefill(3, prompts[3], chunk=3))]}
        assert cache.reserve() == 1, "the lowest free slot first"
        cache.fork(2, 1)
        prompts[1], got[1] = prompts[2], got[2][:]
        rows = [3, 0, 2, 1]
        for step in range(4):
            for slot, logits in zip(rows, cache.decode(rows, torch.tensor([follow[s][step] for s in rows]))):
                got[slot].append(logits)
        assert cache.lengths == [len(prompts[s]) + 4 for s in range(4)]
        for slot in range(4):
            want = alone(model, prompts[slot], follow[slot])
            assert all((a - b).abs().max() < 1e-4 for a, b in zip(got[slot], want)), slot


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_with_int8_on_cpu_a_row_beside_others_gets_exactly_its_numbers_alone(folders, name):
    """What lets `penwright serve` promise a seeded request the same text alone or beside others: rows at
    different lengths (past Mistral's 6-token window too), decoded together, get bit-identical logits,
    with the server's int8 layers (int8 activations where exact, else the weight-only kernel)."""
    from penwright.quantize import int8_activations

    model = load(str(folders[name]), precision="fp32", quantize="int8", engine="penwright", **quiet).model
    int8_activations(model)
    prompts = [list(range(5, 19)), [3, 4], list(range(20, 27))]
    follow = [[40 + 4 * row + i for i in range(4)] for row in range(3)]
    cache = Cache(model, 3, 64)
    with torch.inference_mode():
        got = [[last(cache.prefill(cache.reserve(), p))] for p in prompts]
        for step in range(4):
            for row, logits in enumerate(cache.decode([0, 1, 2], torch.tensor([f[step] for f in follow]))):
                got[row].append(logits)
        for row in range(3):
            assert all(torch.equal(a, b) for a, b in zip(got[row], alone(model, prompts[row], follow[row]))), row


def feeds_of(prompt: list[int], follow: list[int], chunk: int = 5) -> list[tuple[list[int], bool]]:
    """What a slot is fed, pass by pass: its prompt in chunks (logits after the last), then one token at a time."""
    pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)]
    return [(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)] + [([t], True) for t in follow]


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_a_packed_pass_gives_each_slot_the_numbers_it_gets_fed_alone(folders, name):
    """`Cache.feed`, as `penwright serve` runs it with int8 activations: prompt chunks and other slots'
    next tokens in one pass (past Mistral's 6-token window too) get exactly the logits each slot gets
    fed alone; without exact int8 products, close to them."""
    from penwright.quantize import int8_activations, int8_products

    model = load(str(folders[name]), precision="fp32", quantize="int8", engine="penwright", **quiet).model
    exact = int8_activations(model) > 0
    assert exact == bool(int8_products())
    rows = [(list(range(5, 19)), [40, 41, 42]), ([3, 4], [50, 51, 52, 53]), (list(range(20, 27)), [60, 61])]
    plans = [feeds_of(prompt, follow) for prompt, follow in rows]
    with torch.inference_mode():
        want = []
        for plan in plans:  # each slot fed alone, a pass per piece
            cache = Cache(model, 1, 64)
            slot = cache.reserve()
            want.append([out[0] for out in (cache.feed([(slot, ids)], [head]) for ids, head in plan) if len(out)])
        cache, got = Cache(model, 3, 64), [[] for _ in plans]
        slots = [cache.reserve() for _ in plans]
        for step in range(max(len(plan) + i for i, plan in enumerate(plans))):  # slot i starts at step i
            now = [i for i, plan in enumerate(plans) if 0 <= step - i < len(plan)]
            feeds = [plans[i][step - i] for i in now]
            logits = iter(cache.feed([(slots[i], ids) for i, (ids, _) in zip(now, feeds)], [h for _, h in feeds]))
            for i, (_, head) in zip(now, feeds):
                if head:
                    got[i].append(next(logits))
    for i, (prompt, follow) in enumerate(rows):
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(want[i], alone(model, prompt, follow)))  # as unpacked
        assert len(got[i]) == len(want[i])
        same = [torch.equal(a, b) if exact else bool((a - b).abs().max() < 1e-4) for a, b in zip(got[i], want[i])]
        assert all(same), (i, same)


def test_a_full_cache_says_so_and_a_freed_slot_is_reused(folders):
    cache = Cache(writer(folders, "llama", "penwright").model, 2, 8)
    a, b = cache.reserve(), cache.reserve()
    with pytest.raises(RuntimeError, match="all 2 cache slots are in use"):
        cache.reserve()
    cache.free(a)
    assert cache.reserve() == a and cache.lengths[a] == 0
    with pytest.raises(ValueError, match="would hold 9 tokens in a cache of 8"), torch.inference_mode():
        last(cache.prefill(b, list(range(9))))
