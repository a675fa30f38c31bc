"""The speed levers give the same answers as the plain paths: chunked loss, int8 writing, dropout override,
fused GELU; and the allocator setting does what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from penwright import losses
from penwright.config import SampleConfig
from penwright.losses import IGNORE, linear_cross_entropy, lm_loss
from penwright.quantize import BACKENDS, Int8Linear, exact_backends, int8_activations, int8_products, quantize_int8
from penwright.training import set_dropout


def tiny_gpt2(vocab: int = 300):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_loss_matches_cross_entropy_in_value_and_gradients(monkeypatch, autocast):
    monkeypatch.setattr(losses, "CHUNK_TOKENS", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[3, 11]] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = linear_cross_entropy(hidden, weight, targets) / 18
        plain = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE)
    tolerance = 1e-2 if autocast else 1e-5
    assert torch.allclose(ours, plain, atol=tolerance)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight))):
        assert torch.allclose(a, b, atol=tolerance)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets) / 18, ours, atol=tolerance)


def test_fused_lm_loss_equals_the_plain_one_on_gpt2():
    model = tiny_gpt2().eval()  # no dropout: both paths see the same forward
    x = torch.randint(0, 300, (2, 24))
    y = torch.randint(0, 300, (2, 24))
    y[0, :5] = IGNORE
    fused = lm_loss(model, x, y)
    fused_grad = torch.autograd.grad(fused, model.lm_head.weight)[0]
    plain = lm_loss(model, x, y, fused=False)
    plain_grad = torch.autograd.grad(plain, model.lm_head.weight)[0]
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(fused_grad, plain_grad, atol=1e-6)
    assert torch.allclose(lm_loss(model, x, y, reduction="sum"), plain * (y != IGNORE).sum(), rtol=1e-5)


def test_int8_linear_layers_stay_close_to_bf16():
    model = tiny_gpt2().to(torch.bfloat16).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits.float()
        quantize_int8(model)
        after = model(input_ids=x).logits.float()
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)
    assert (before - after).abs().max() < 0.05 * before.abs().max()
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() > 0.9


def int8_layer(dtype: torch.dtype):
    """An `Int8Linear` (in a Sequential, as `int8_activations` takes models), rows of very different
    columns for it, and the answer its stored weights make of them."""
    torch.manual_seed(0)
    layer = nn.Sequential(Int8Linear(torch.randn(96, 64), torch.randn(96), dtype))
    int8 = layer[0]
    x = (torch.randn(16, 64) * torch.logspace(-2, 1, 64)).to(dtype)  # columns of very different sizes
    stored = int8.weight.double() * int8.scale_bits.view(torch.bfloat16).double()[:, None]
    stored[:, int8.column] = int8.exact.double()
    return layer, x, x.double() @ stored.T + int8.bias.double()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activations_keep_each_rows_numbers_and_the_int8_weights_answer(backend, dtype):
    if backend not in exact_backends():
        pytest.skip(f"{backend} has no exact int8 products on this CPU")
    layer, x, exact = int8_layer(dtype)
    int8 = layer[0]
    with torch.no_grad():
        weight_only = layer(x).double()  # its activations rounded to bf16 for PyTorch's int8 kernel
        int8.take_int8_activations(backend)
        both = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert isinstance(int8.packed, BACKENDS[backend]) and not hasattr(int8, "weight")  # the packed copy replaces it
    assert torch.equal(both, alone)  # a row's numbers do not depend on the rows beside it
    error = (both.double() - exact).abs().max() / exact.abs().max()
    coarser = 127 / BACKENDS[backend].levels  # 14-bit activations, 13 with FBGEMM's 63 levels
    assert error < (1.5e-4 * coarser if dtype == torch.float32 else 1e-2)  # bf16 rounds the output
    assert error <= (weight_only - exact).abs().max() / exact.abs().max()


@pytest.mark.skipif(int8_products() is None, reason="this CPU has no exact int8 products")
def test_int8_activations_for_batches_keep_the_weight_only_kernel_for_one_row_until_serving_takes_every_row():
    layer, x, _ = int8_layer(torch.float32)
    int8 = layer[0]
    with torch.no_grad():
        weight_only = layer(x)
        assert int8_activations(layer, keep_weights=True) == 1  # as `penwright generate` does on FBGEMM's CPUs
        assert torch.equal(layer(x[:1]), weight_only[:1])  # one row: still the weight-only kernel
        assert not torch.equal(layer(x[:2]), weight_only[:2])  # two rows: int8 activations
        assert int8_activations(layer) == 1 and int8_activations(layer) == 0  # serving: every row, once
        assert not hasattr(int8, "weight")
        assert torch.equal(layer(x[:1]), layer(x[:2])[:1])


def test_generate_sends_batches_through_fbgemm_where_it_is_the_int8_backend_and_one_row_through_the_kernel(
        tiny_run, monkeypatch):
    """On x86 CPUs without VNNI, FBGEMM's int8 products beat the weight-only kernel's fp32 ones from two
    rows, so the first batch packs the weights for them; elsewhere (oneDNN's CPUs, ARM) `penwright
    generate` keeps the weight-only kernel."""
    from penwright import generate, quantize

    def int8_layers(writer):
        return [m for m in writer.model.modules() if isinstance(m, Int8Linear)]

    cfg = SampleConfig(max_new_tokens=8, seed=5, num_samples=2, batch_size=2)
    here = generate.load(str(tiny_run), precision="fp32", quantize="int8", log=lambda *_: None)
    here.samples(["Once"], cfg)
    assert all((m.packed is not None) == (int8_products() == "fbgemm") for m in int8_layers(here))
    if "fbgemm" not in exact_backends():
        pytest.skip("FBGEMM has no exact int8 products on this CPU")
    for module in (generate, quantize):
        monkeypatch.setattr(module, "int8_products", lambda: "fbgemm")
    writer = generate.load(str(tiny_run), precision="fp32", quantize="int8", log=lambda *_: None)
    layers = int8_layers(writer)
    writer.samples(["Once"], replace(cfg, num_samples=1))
    assert layers and all(m.packed is None for m in layers)  # one row: nothing packed (it costs load time)
    first = [s.text for s in writer.samples(["Once"], cfg)]
    assert all(isinstance(m.packed, BACKENDS["fbgemm"]) and hasattr(m, "weight") for m in layers)
    assert first == [s.text for s in writer.samples(["Once"], cfg)] and all(first)


def test_int8_writer_is_reproducible_and_batches(tmp_path):
    from penwright.generate import Writer
    from penwright.tokens import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], 300)
    model = quantize_int8(tiny_gpt2(len(tokenizer)).to(torch.bfloat16))
    writer = Writer(model, tokenizer, log=lambda *_: None)
    cfg = SampleConfig(max_new_tokens=12, seed=3, num_samples=3, batch_size=2)
    first, second = writer.samples(["the cat"], cfg), writer.samples(["the cat"], cfg)
    assert [s.text for s in first] == [s.text for s in second]
    assert all(s.new_tokens > 0 for s in first)


def test_dropout_override_keeps_the_saved_config():
    model = tiny_gpt2()
    set_dropout(model, None, 0.0)  # the defaults: the model's own, but none on attention probabilities
    assert model.transformer.h[0].attn.attn_dropout.p == 0.0
    assert model.transformer.h[0].attn.resid_dropout.p == model.transformer.h[0].mlp.dropout.p == 0.1
    set_dropout(model, 0.0, 0.2)
    assert model.transformer.h[0].attn.attn_dropout.p == 0.2 and model.transformer.drop.p == 0.0
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.1  # the saved config keeps the model's own


def test_fused_gelu_is_the_same_function_and_leaves_the_config_alone(tmp_path):
    from transformers.activations import GELUTanh

    from penwright.kernels import fuse_gelu

    model = tiny_gpt2().eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        before = model(input_ids=x).logits
        fuse_gelu(model)
        after = model(input_ids=x).logits
    assert isinstance(model.transformer.h[1].mlp.act, GELUTanh)
    assert torch.allclose(before, after, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert '"activation_function": "gelu_new"' in (tmp_path / "config.json").read_text()


KEEP = """
import json, resource, sys, torch
from penwright.devices import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
counts = []
for _ in range(14):  # like training steps: allocate large activations (glibc maps each apart), free them all
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(n * 2 ** 20) for n in (8, 16, 4, 12)]
    del blocks
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(counts[4:]))  # after the warm-up, while the heap may still settle
"""
STEP_PAGES = 40 * 2 ** 20 * 4 // 4096  # the 160 MB each step touches, in 4 KiB pages
# With `system`, glibc maps blocks above its mmap threshold (at most 32 MB) apart and unmaps them when
# freed, so at least the 64 MB and 48 MB blocks (28,672 pages) fault in again every step.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    """What the setting guarantees on any glibc machine, whatever its speed: with `system` every step
    faults its pages in again; with `keep` a typical step faults almost none (the heap may still grow
    once or twice while it settles, so the median, not the total, is compared)."""
    faults = {mode: json.loads(subprocess.run([sys.executable, "-c", KEEP, mode], capture_output=True, text=True,
                                              check=True).stdout) for mode in ("keep", "system")}
    assert min(faults["system"]) > STEP_PAGES / 2, faults  # every step, again and again
    assert sorted(faults["keep"])[len(faults["keep"]) // 2] < STEP_PAGES / 20, faults  # a steady heap
    assert sum(faults["keep"]) < sum(faults["system"]) / 3, faults


def test_cpu_attention_with_dropout_matches_sdpa_and_drops(monkeypatch):
    from penwright.kernels import ATTENTION, use_cpu_attention

    model = tiny_gpt2().train()
    set_dropout(model, 0.0, 1e-9)  # dropout on attention only, and so little that nothing is dropped
    x = torch.randint(0, 300, (2, 24))
    weight = model.transformer.h[0].attn.c_attn.weight

    def logits_and_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits.float()
        return logits, torch.autograd.grad(logits.square().mean(), weight)[0]

    plain, plain_grad = logits_and_grad()
    use_cpu_attention(model)
    assert model.config._attn_implementation == ATTENTION
    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    ours, ours_grad = logits_and_grad()
    assert not calls  # bf16 blocks with attention dropout took the plain ops
    assert (ours - plain).abs().max() < 0.02 * plain.abs().max()
    assert (ours_grad - plain_grad).abs().max() < 0.02 * plain_grad.abs().max()
    set_dropout(model, 0.0, 0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dropped = model(input_ids=x).logits.float()
    assert (dropped - plain).abs().max() > 0.1 * plain.abs().max()
    model.eval()  # no dropout, padded batches: SDPA as before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x)
        model(input_ids=x, attention_mask=torch.tensor([[1] * 24, [0] * 4 + [1] * 20]))
    assert len(calls) == 2 * model.config.n_layer
