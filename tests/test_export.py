"""`penwright export --gguf`: files llama.cpp reads as its own conversions, checked against the run.

Files are read back with the gguf package's own reader (names, shapes, types, tokenizer metadata)
and with transformers' GGUF loader (the parity check, generate, eval). Two models: the tiny GPT-2
trained from scratch with genre control tokens (conftest's tiny_run), and a tiny random Llama with
a SmolLM-style tokenizer, a ChatML template and one control token.
"""

from __future__ import annotations

import csv
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import conftest
from conftest import FillsUp, one_error_line, tmpfs
from penwright import parity
from penwright.cli import main
from penwright.config import ExportConfig
from penwright.corpus import Document
from penwright.errors import PenwrightError
from penwright.export import export

QUANTIZE = ("f32", "f16", "q8_0")
TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
quiet = dict(log=lambda *_: None)


def export_file(run, out, quantize="f16", **settings) -> list[str]:
    """Export `run` to `out`; the parity check's lines."""
    lines = []
    cfg = ExportConfig(gguf=str(run), out=str(out), quantize=quantize, **settings)
    export(cfg, report=lines.append, **quiet)
    return lines


def field(reader, key):
    return reader.fields[key].contents()


def tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama (4 heads, 2 KV heads, untied head, FFN width 136: not a multiple of 32,
    3 embeddings more than tokens) with a byte-level BPE that splits digits like SmolLM's, ChatML and
    a label's control token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from penwright.tokens import add_control_tokens

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([row["synopsis"] for row in conftest.sample_rows()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    add_control_tokens(tokenizer, ["<|genre=horror|>"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=136,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_files(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: (folder / f"tiny.{q}.gguf", export_file(tiny_run, folder / f"tiny.{q}.gguf", q))
            for q in QUANTIZE}


@pytest.fixture(scope="module")
def llama_files(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: (folder / f"llama.{q}.gguf", export_file(tiny_llama, folder / f"llama.{q}.gguf", q))
            for q in QUANTIZE}


# --- what the files hold ---------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", QUANTIZE)
def test_gpt2_files_hold_gpt2s_tensors_and_pass_the_check(gpt2_files, tiny_run, quantize):
    path, lines = gpt2_files[quantize]
    assert lines[-1] == "passed", lines
    assert sum(line.strip().startswith("greedy") for line in lines) == 3  # two prompts and a label prompt
    reader = gguf.GGUFReader(path)
    config = json.loads((tiny_run / "config.json").read_text())
    n, vocab, context = config["n_embd"], config["vocab_size"], 64  # the run's block size
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == context and field(reader, "gpt2.block_count") == 4
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[quantize]
    layer = {"attn_norm.weight": [n], "attn_norm.bias": [n], "attn_qkv.weight": [n, 3 * n],
             "attn_qkv.bias": [3 * n], "attn_output.weight": [n, n], "attn_output.bias": [n],
             "ffn_norm.weight": [n], "ffn_norm.bias": [n], "ffn_up.weight": [n, 4 * n],
             "ffn_up.bias": [4 * n], "ffn_down.weight": [4 * n, n], "ffn_down.bias": [n]}
    expected = {"token_embd.weight": [n, vocab], "position_embd.weight": [n, context],
                "output_norm.weight": [n], "output_norm.bias": [n],
                **{f"blk.{i}.{name}": shape for i in range(4) for name, shape in layer.items()}}
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected  # no output.weight: GPT-2 ties it
    for t in reader.tensors:
        matrix = len(t.shape) == 2 and t.name != "position_embd.weight"
        assert t.tensor_type.name == (TYPES[quantize] if matrix else "F32"), t.name


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_llama_files_hold_llamas_tensors_and_pass_the_check(llama_files, quantize):
    path, lines = llama_files[quantize]
    assert lines[-1] == "passed", lines
    assert any("penwright's sample stories" in line for line in lines)  # not a run: no validation split
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == field(reader, "llama.attention.key_length") == 16
    assert field(reader, "llama.context_length") == 256 and field(reader, "general.size_label").endswith("K")
    layer = {"attn_norm.weight": [64], "attn_q.weight": [64, 64], "attn_k.weight": [64, 32],
             "attn_v.weight": [64, 32], "attn_output.weight": [64, 64], "ffn_norm.weight": [64],
             "ffn_gate.weight": [64, 136], "ffn_up.weight": [64, 136], "ffn_down.weight": [136, 64]}
    expected = {"token_embd.weight": [64, 604], "output_norm.weight": [64], "output.weight": [64, 604],
                **{f"blk.{i}.{name}": shape for i in range(2) for name, shape in layer.items()}}
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.1.attn_q.weight"] == TYPES[quantize]
    # rows of 136 values cannot be cut into q8_0's blocks of 32: f16, as llama.cpp's converter does
    assert kinds["blk.0.ffn_down.weight"] == ("F16" if quantize == "q8_0" else TYPES[quantize])


def test_gpt2_tokenizer_travels_whole(gpt2_files, tiny_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    reader = gguf.GGUFReader(gpt2_files["q8_0"][0])
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    labels = {i for token, i in tokenizer.get_vocab().items() if token.startswith("<|genre=")}
    assert len(labels) == 6 and len(tokens) == len(tokenizer) == 518
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    T = gguf.TokenType
    assert types == [T.CONTROL if i == tokenizer.eos_token_id else T.USER_DEFINED if i in labels else T.NORMAL
                     for i in range(len(tokens))]
    merges = json.loads((tiny_run / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        assert field(reader, f"tokenizer.ggml.{key}") == tokenizer.eos_token_id == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    assert "tokenizer.chat_template" not in reader.fields


def test_llama_tokenizer_keeps_its_chat_template_and_end_of_turn(llama_files, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    reader = gguf.GGUFReader(llama_files["f16"][0])
    assert field(reader, "tokenizer.ggml.pre") == "smollm"  # digits one by one, then GPT-2's split
    assert field(reader, "tokenizer.chat_template") == CHATML
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field(reader, "tokenizer.ggml.eot_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == end
    types, tokens = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 604 and tokens[600] == "<|genre=horror|>"
    assert types[600] == gguf.TokenType.USER_DEFINED and types[:3] == [gguf.TokenType.CONTROL] * 3
    assert tokens[601:] == ["[PAD601]", "[PAD602]", "[PAD603]"] and types[601:] == [gguf.TokenType.UNUSED] * 3


def test_a_prompt_with_a_control_token_reads_back_as_that_one_id(gpt2_files, tiny_run):
    from transformers import AutoTokenizer

    path = gpt2_files["q8_0"][0]
    exported = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # transformers' GGUF tokenizer
    original = AutoTokenizer.from_pretrained(tiny_run)
    prompt = "<|genre=horror|>The house at the end of the lane"
    ids = exported.encode(prompt, add_special_tokens=False)
    assert ids == original.encode(prompt, add_special_tokens=False)
    assert ids[0] == original.convert_tokens_to_ids("<|genre=horror|>") and ids.count(ids[0]) == 1


# --- the values ------------------------------------------------------------------------------------

def test_an_f32_file_holds_the_runs_weights_exactly(gpt2_files, tiny_run):
    weights = load_file(tiny_run / "model.safetensors")
    reader = gguf.GGUFReader(gpt2_files["f32"][0])
    assert np.array_equal(tensor(reader, "token_embd.weight").data, weights["transformer.wte.weight"].numpy())
    assert np.array_equal(tensor(reader, "blk.2.attn_qkv.weight").data,  # Conv1D's (in, out), transposed
                          weights["transformer.h.2.attn.c_attn.weight"].numpy().T)
    positions = weights["transformer.wpe.weight"][:64].numpy()  # the 64 the run learned, of 256
    assert np.array_equal(tensor(reader, "position_embd.weight").data, positions)


def test_q8_0_blocks_are_32_int8_values_and_an_f16_scale(gpt2_files, tiny_run):
    """The layout from the GGUF spec, computed here with plain numpy: scale = max|x| / 127 as f16,
    values = x / scale rounded (ggml multiplies by 1/scale, so a value may round the other way)."""
    x = load_file(tiny_run / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"].numpy().T.reshape(-1, 32)
    blocks = np.ascontiguousarray(tensor(gguf.GGUFReader(gpt2_files["q8_0"][0]), "blk.1.ffn_up.weight").data)
    blocks = blocks.reshape(-1, 34)
    scale, values = blocks[:, :2].view(np.float16)[:, 0], blocks[:, 2:].view(np.int8).astype(int)
    exact = np.abs(x).max(axis=1) / 127
    assert np.array_equal(scale, exact.astype(np.float16))
    expected = np.round(x / exact[:, None]).astype(int)
    assert np.abs(values - expected).max() <= 1 and (values == expected).mean() > 0.999
    error = np.abs(values * scale[:, None].astype(np.float32) - x)
    assert (error <= 0.57 * exact[:, None]).all()  # half a step, and the f16 scale's own rounding


def rope(x: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding with HF's pairs (i, i + d/2) or llama.cpp's "normal" pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    angle = positions[:, None, None] * 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angle.cos(), angle.sin()
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d // 2], x[..., d // 2:])
    turned = (a * cos - b * sin, a * sin + b * cos)
    return torch.stack(turned, -1).flatten(-2) if interleaved else torch.cat(turned, -1)


def test_llama_attention_is_the_same_when_rotated_the_way_llama_cpp_does(llama_files, tiny_llama):
    """llama.cpp rotates pairs of neighbouring rows; HF rotates row i with row i + d/2. The file's
    q/k rows are reordered so that llama.cpp's rotation gives HF's attention scores."""
    weights = load_file(tiny_llama / "model.safetensors")
    reader = gguf.GGUFReader(llama_files["f32"][0])
    h, positions = torch.randn(7, 64, generator=torch.Generator().manual_seed(0)), torch.arange(7.0)

    def scores(q_weight, k_weight, interleaved):
        q = rope((h @ torch.as_tensor(q_weight).T).view(7, 4, 16), positions, interleaved)
        k = rope((h @ torch.as_tensor(k_weight).T).view(7, 2, 16), positions, interleaved)
        return torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(2, dim=1))  # 2 query heads per KV head

    hf = scores(*(weights[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qk"), interleaved=False)
    stored = [np.array(tensor(reader, f"blk.1.attn_{x}.weight").data) for x in "qk"]
    assert torch.allclose(scores(*stored, interleaved=True), hf, atol=1e-5)
    assert not torch.allclose(scores(*stored, interleaved=False), hf, atol=1e-2)  # the order matters


# --- the parity check -------------------------------------------------------------------------------

def corrupt(path) -> None:
    """Reverse the rows of the file's token embedding table, in place."""
    reader = gguf.GGUFReader(path, "r+")
    rows = tensor(reader, "token_embd.weight").data
    rows[:] = rows[::-1].copy()
    reader.data.flush()


def test_a_file_with_corrupted_tensors_fails_the_check_with_exit_1(tiny_run, tmp_path, monkeypatch, capsys):
    real_check = parity.check

    def check_a_damaged_file(reference, path, *args):
        corrupt(path)
        return real_check(reference, path, *args)

    monkeypatch.setattr(parity, "check", check_a_damaged_file)
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--gguf", str(tiny_run), "--out", str(out), "--quantize", "q8_0"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("penwright: error: ") == 1  # after the log and progress bars, one line
    error = captured.err.split("penwright: error: ")[1]
    assert error.startswith(f"{out} did not pass the parity check against {tiny_run}: ") and error.count("\n") == 1
    assert "greedy tokens differ" in error and "the file is kept" in error
    assert captured.out.strip().splitlines()[-1].startswith("did not pass: ")
    assert out.is_file()


@pytest.fixture(scope="module")
def run_writer(tiny_run):
    from penwright.generate import load

    return load(str(tiny_run), "fp32", "cpu", engine="hf", **quiet)


def test_the_check_compares_tokenizers_before_models(run_writer, llama_files):
    """Checking the Llama's file against the GPT-2 run: other ids, and no model comparison after them."""
    result = parity.check(run_writer, llama_files["f32"][0], "f32", [], "nothing")
    assert len(result.failures) == 1 and result.failures[0].startswith("the tokenizer gives other ids for ")
    assert not any(line.strip().startswith(("greedy", "perplexity")) for line in result.lines)


def test_a_file_transformers_cannot_read_or_that_writes_nan_fails_the_check(run_writer, gpt2_files, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    result = parity.check(run_writer, garbage, "f16", [], "nothing")
    assert result.failures[0].startswith("transformers cannot read the file back (")
    assert result.lines[-1].startswith("did not pass: transformers cannot read the file back")
    nan = tmp_path / "nan.gguf"
    shutil.copy(gpt2_files["f32"][0], nan)
    reader = gguf.GGUFReader(nan, "r+")
    tensor(reader, "output_norm.weight").data[:] = np.nan
    reader.data.flush()
    story = Document(text=conftest.sample_rows()[0]["synopsis"], label="horror")
    result = parity.check(run_writer, nan, "f32", [story], "one story")
    assert any(f.startswith("perplexity nan against the run's ") for f in result.failures), result.failures


# --- reading the files back ------------------------------------------------------------------------

def test_generate_writes_from_an_exported_file_what_the_run_writes(gpt2_files, tiny_run, capsys):
    argv = ["generate", "--label", "horror", "--greedy", "--max-new-tokens", "24", "--precision", "fp32",
            "--prompt", "The house"]
    assert main([*argv, "--model", str(tiny_run)]) == 0
    from_run = capsys.readouterr().out
    assert main([*argv, "--model", str(gpt2_files["f32"][0])]) == 0
    assert capsys.readouterr().out == from_run and len(from_run) > len("The house\n")


def test_eval_scores_an_exported_file_like_its_run(gpt2_files, tiny_run, tmp_path):
    from penwright import EvalConfig, evaluate

    with open(tmp_path / "held_out.csv", "w", newline="") as f:
        csv.writer(f).writerows([("synopsis", "genre")] + [(r["synopsis"], r["genre"])
                                                           for r in conftest.sample_rows()[::40]])
    path = str(gpt2_files["q8_0"][0])
    report = evaluate(EvalConfig(model=[str(tiny_run), path], data=str(tmp_path / "held_out.csv"),
                                 text_column="synopsis", label_column="genre", max_passages=2, num_samples=1,
                                 label_samples=1, max_new_tokens=8, holdout_words=5), **quiet)["models"]
    run, file = (report[m]["perplexity"]["perplexity"] for m in (str(tiny_run), path))
    assert abs(file / run - 1) < 0.01
    assert report[path]["label_control"] is not None  # the labels survived the round trip


# --- Ollama ----------------------------------------------------------------------------------------

def test_an_ollama_modelfile_names_the_file_its_stops_defaults_and_labels(tiny_run, tiny_llama, tmp_path):
    export_file(tiny_run, tmp_path / "stories.gguf", ollama=True, no_check=True)
    text = (tmp_path / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./stories.gguf" in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert {"PARAMETER temperature 0.8", "PARAMETER top_k 40", "PARAMETER top_p 1.0",
            "PARAMETER num_ctx 64"} <= set(lines)
    assert "<|genre=comedy|>Once upon a time" in text and "TEMPLATE" not in text
    export_file(tiny_llama, tmp_path / "chat.gguf", ollama=True, no_check=True)
    text = (tmp_path / "Modelfile").read_text()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in text
    stops = {'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"'}
    assert stops | {"FROM ./chat.gguf"} <= set(text.splitlines())


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken_runs(tiny_run, tmp_path_factory):
    """A run whose training has not finished, and a run whose last checkpoint is still being written."""
    root = tmp_path_factory.mktemp("broken")
    unfinished = root / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    for name in ("config.json", "model.safetensors"):
        (unfinished / name).unlink()
    writing = root / "writing"
    shutil.copytree(tiny_run, writing)
    (writing / "checkpoints" / "step-00000060" / "manifest.json").unlink()
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("argv, expected", [
    (["--gguf", "{root}/unfinished"], "training has not finished, so there is no final model yet"),
    (["--gguf", "{root}/writing/checkpoints/step-00000060"], "a checkpoint still being written"),
    (["--gguf", "{root}/empty"], "not a finished run (no config.json)"),
    (["--gguf", "{root}/missing"], "no such run directory"),
    (["--gguf", "{run}", "--out", "{tmp}/no/such/x.gguf"], "the folder {tmp}/no/such does not exist"),
    (["--gguf", "{run}", "--out", "{tmp}/x.bin"], "name the GGUF file, e.g. model.gguf"),
    (["--gguf", "{run}", "--merge", "{run}"], "give --gguf or --merge, not both"),
    (["--merge", "{run}", "--out", "{tmp}/m", "--ollama"], "--ollama and --no-check go with --gguf"),
    (["--gguf", "{neox}"], "architecture 'gpt_neox' cannot be exported to GGUF; supported: gpt2"),
])
def test_bad_input_gets_one_line_exit_2_and_no_file(argv, expected, broken_runs, tiny_run, neox, tmp_path,
                                                    capsys):
    names = {"{root}": str(broken_runs), "{run}": str(tiny_run), "{tmp}": str(tmp_path), "{neox}": str(neox)}

    def fill(text):
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    argv = [fill(a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.gguf")]
    line = one_error_line(capsys, "export", *argv)
    assert fill(expected) in line
    assert not list(tmp_path.iterdir()), "nothing written, not even a temporary file"


@pytest.fixture(scope="module")
def neox(tiny_run, tmp_path_factory):
    """A tiny GPT-NeoX: a causal LM penwright can train but not export."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    path = tmp_path_factory.mktemp("neox") / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_quantization_it_does_not_know_is_refused(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["export", "--gguf", str(tiny_run), "--out", str(tmp_path / "x.gguf"), "--quantize", "q4_7"])
    assert exit.value.code == 2 and "--quantize: invalid choice: 'q4_7'" in capsys.readouterr().err
    with pytest.raises(PenwrightError, match=r"^--quantize must be one of f32, f16, q8_0, got 'q4_7'$"):
        ExportConfig(gguf=str(tiny_run), out=str(tmp_path / "x.gguf"), quantize="q4_7")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_writing_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    def open_on_full_disk(path, mode="r", *args, **kwargs):
        return FillsUp(open(path, mode, *args, **kwargs), room=4096)  # the tokenizer's metadata fills it

    monkeypatch.setattr(gguf.gguf_writer, "open", open_on_full_disk, raising=False)
    out = tmp_path / "tiny.gguf"
    line = one_error_line(capsys, "export", "--gguf", str(tiny_run), "--out", str(out))
    assert line == (f"penwright: error: disk full while writing {out}: free space on that disk and export "
                    f"again; nothing was written to {out}")
    assert not list(tmp_path.iterdir())


def test_a_really_full_disk_leaves_nothing(tiny_run, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "512k") as disk:  # the q8_0 file is about 1 MB
        out = disk / "tiny.gguf"
        line = one_error_line(capsys, "export", "--gguf", str(tiny_run), "--out", str(out),
                                       "--quantize", "q8_0", "--no-check")
        assert "disk full while writing" in line and not list(disk.iterdir())


def test_a_complete_checkpoint_exports_under_its_runs_name(tiny_run, tmp_path):
    out = tmp_path / "step.gguf"
    export_file(tiny_run / "checkpoints" / "step-00000060", out, no_check=True)
    assert field(gguf.GGUFReader(out), "general.name") == f"{tiny_run.name}-step-00000060"


def test_rounding_may_swap_near_ties_but_not_clear_picks(run_writer, monkeypatch):
    """At f16/q8_0, a pick the run itself rates within NEAR_TIE of its own does not count against the file."""
    n = parity.GREEDY_TOKENS
    run = torch.full((n, 4), -9.0)
    run[:, 0] = -0.5
    run[:3, 1] = -0.5 - parity.NEAR_TIE / 2  # three near-ties ...
    run[3, 2] = -3.0  # ... and one clear second choice
    file = run.clone()
    file[:4, 1:3] = 0.0  # the file picks token 1 where the run was near a tie, token 2 at position 3
    monkeypatch.setattr(parity, "log_probs", lambda writer, ids, new: run if writer is run_writer else file)
    lines = []
    for allowed, passes in ((1, True), (0, False)):  # q8_0: the near-ties aside, one difference; f32: none
        result = parity.Parity()
        parity.greedy(run_writer, object(), "Once upon a time", None, allowed, result)
        assert (not result.failures) == passes, result.lines
        lines.append(result.lines[0])
    assert "28/32 tokens agree (3 of the others near-ties) after" in lines[0]
    assert "28/32 tokens agree after" in lines[1]
