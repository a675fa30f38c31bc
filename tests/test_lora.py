"""LoRA: only adapters train, the run dir holds just the adapter, resume is exact, merging changes nothing."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from penwright import TrainConfig, train
from penwright.cli import main
from penwright.config import LoraSpec, parse_lora
from penwright.lora import attach, export_merged
from penwright.runs import read_metrics

quiet = dict(log=lambda *_: None)


def lora_config(data, model, out, **overrides) -> TrainConfig:
    settings = dict(data=str(data), model=str(model), out=str(out), lora="r=4,alpha=8,dropout=0", lr=1e-2,
                    block_size=32, batch_size=8, max_steps=12, log_every=3, save_every=6, eval_every=0,
                    eval_batches=2, sample_every=0, sample_length=8, precision="fp32", seed=1)
    return TrainConfig(**{**settings, **overrides})


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, stories_txt, tiny_base):
    return train(lora_config(stories_txt, tiny_base, tmp_path_factory.mktemp("runs") / "lora"), **quiet)


def test_only_adapter_weights_train_and_are_saved(lora_run, tiny_base):
    from transformers import AutoModelForCausalLM

    model = attach(AutoModelForCausalLM.from_pretrained(tiny_base), parse_lora("r=4,alpha=8"), str(tiny_base))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) < 0.05 * model.num_parameters()

    assert (lora_run / "adapter_config.json").is_file() and not (lora_run / "model.safetensors").exists()
    saved = load_file(lora_run / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    state = torch.load(lora_run / "checkpoints" / "step-00000012" / "trainer_state.pt", weights_only=True)
    assert all("lora_" in name for name in state["optimizer"]["state"])  # the optimizer never saw the base

    curve = losses(lora_run)
    assert curve[12] < curve[3] - 0.02


def test_resume_continues_the_adapter_exactly(lora_run, tmp_path, stories_txt, tiny_base):
    run = tmp_path / "lora"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    train(lora_config(stories_txt, tiny_base, run, resume=True), **quiet)
    expected, got = losses(lora_run), losses(run)
    assert all(abs(got[s] - expected[s]) < 1e-5 for s in (9, 12)), (got, expected)


def test_merged_export_matches_adapter_inference(lora_run, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from penwright import load

    out = export_merged(str(lora_run), str(tmp_path / "merged"), **quiet)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), lora_run).eval()
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter(input_ids=x).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=x).logits,
                                  atol=1e-3)  # the adapter changed something
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-4)
        writer = load(str(lora_run), precision="fp32", device="cpu", **quiet)  # generation merges on load
        assert torch.allclose(writer.model(input_ids=x).logits, expected, atol=1e-4)
    assert writer.generate("The", max_new_tokens=5, seed=1)


def test_export_refuses_what_it_cannot_merge(tmp_path, tiny_base, capsys):
    assert main(["export", "--merge", str(tiny_base), "--out", str(tmp_path / "m")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text, spec", [
    ("r=16,alpha=32,dropout=0.05", LoraSpec(16, 32.0, 0.05)),
    ("r=8", LoraSpec(r=8)),
    ("r=4,targets=c_attn,c_proj,alpha=4", LoraSpec(4, 4.0, 0.05, ("c_attn", "c_proj"))),
])
def test_parse(text, spec):
    assert parse_lora(text) == spec


def test_a_lora_run_exports_to_gguf_with_its_adapter_merged(lora_run, tiny_base, tmp_path):
    import gguf

    from penwright.config import ExportConfig
    from penwright.export import export
    from penwright.lora import merged
    from penwright.tokens import load_tokenizer

    lines, out = [], tmp_path / "lora.gguf"
    export(ExportConfig(gguf=str(lora_run), out=str(out), quantize="f32"), report=lines.append, **quiet)
    assert lines[-1] == "passed", lines
    stored = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_qkv.weight").data
    model = merged(str(lora_run), load_tokenizer(str(lora_run)))
    assert torch.equal(torch.from_numpy(stored.copy()), model.transformer.h[0].attn.c_attn.weight.T)
    base = load_file(tiny_base / "model.safetensors")["transformer.h.0.attn.c_attn.weight"].T
    assert not torch.allclose(torch.from_numpy(stored.copy()), base, atol=1e-4)  # the adapter is in it
