"""Int8 weight-only quantization for writing on CPU.

Writing one token at a time reads every weight once per step, so on a CPU its speed is set by
how many bytes the weights take: int8 halves bf16 and quarters fp32. Each output channel keeps
its own scale (absmax / 127), and activations stay bf16, so the text barely changes: see
benchmarks/RESULTS.md for perplexity and greedy-token agreement against fp32.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """`x @ weight.T + bias` with `weight` stored as int8 rows and one scale per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (weight / scale[:, None]).round().to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every linear layer (and HF GPT-2's transposed Conv1D) for an `Int8Linear`, in place.

    Embeddings stay as they are, so a head tied to the input embedding gets its own int8 copy.
    Conv1D is known by its class name: importing transformers costs penwright's own GPT-2
    (gpt2.py, which also calls this) its fast start.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias, dtype))
            elif type(child).__name__ == "Conv1D":  # stores (in, out): transpose to (out, in)
                setattr(parent, name, Int8Linear(child.weight.T, child.bias, dtype))
    return model
