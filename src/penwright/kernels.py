"""Faster stand-ins for pieces of Hugging Face models: the same maths in fewer passes over memory.

Swapped into the live model for training; nothing here changes what is saved. The measured
gains are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch

ATTENTION = "penwright"  # the name `causal_attention` is registered under with transformers


def fuse_gelu(model) -> None:
    """Swap GPT-2's `gelu_new`, written as eight elementwise ops, for PyTorch's one-kernel tanh GELU.

    The same function up to rounding, without the seven intermediates autograd would keep; the
    saved config still says gelu_new.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, GELUTanh())


def use_cpu_attention(model) -> None:
    """Train with `causal_attention` where the model dispatches attention through transformers'
    AttentionInterface (GPT-2, Llama and most current models); others keep their own."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, causal_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # no mask at all for unpadded causal blocks
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(ATTENTION)


_causal_masks: dict[tuple[int, torch.device], torch.Tensor] = {}


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """Causal self-attention with dropout on its probabilities, on CPU under bf16 autocast, as
    three plain ops.

    PyTorch's fused CPU attention kernel has no dropout, so with attention dropout (GPT-2's own
    is 0.1) SDPA falls back to its unfused math path, about four times slower than these ops at
    512 tokens; with them a GPT-2 124M step runs at the speed of the fused kernel without dropout
    (benchmarks/RESULTS.md), for one (tokens x tokens) matrix of probabilities per layer kept for
    backward. Everything else (no dropout, fp32, padded batches, cached decoding, GPUs) goes to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if (not dropout or attention_mask is not None or key.shape[2] != length or query.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = _causal_masks.get((length, query.device))
    if mask is None:
        mask = _causal_masks[length, query.device] = torch.ones(length, length, dtype=torch.bool,
                                                                device=query.device).triu(1)
    dtype = torch.get_autocast_dtype("cpu")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast("cpu", enabled=False):  # a bf16 softmax: autocast would make it fp32, twice the memory
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        scores = (q @ k.transpose(-1, -2)).mul_(scale).masked_fill_(mask, float("-inf"))
        probs = torch.nn.functional.dropout(scores.softmax(-1), dropout)
        return (probs @ v).transpose(1, 2), None
