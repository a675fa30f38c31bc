"""Int8 weight-only quantization for writing on CPU, in fp32 or bf16 compute.

Writing one token at a time reads every weight once per step, so on a CPU its speed is set by
how many bytes the weights take: int8 halves bf16 and quarters fp32. Each output channel keeps
its own scale (absmax / 127). PyTorch's int8 kernel (`torch._weight_int8pack_mm`) is fast only
with bf16 activations, on every CPU (with fp32 ones it falls back to a reference loop many times
slower than an fp32 matmul), so the few rows of a decode step go to it as bf16, accumulate in fp32
inside it and come back in the model's dtype: everything around the layer (norms, attention,
residuals, the KV cache) keeps that dtype. The kernel's time grows with the rows, so a prefill of
many rows multiplies by the dequantized weight instead, which a CPU's matmul does faster.

A row's scale is set by its largest weight, and one input column of outsized weights coarsens
every row: each layer keeps that column exact, beside the int8 rows. On SmolLM2-135M this cut
int8's perplexity cost from +1.2% to +0.8% of fp32's (16 windows of tinyshakespeare), for one
more elementwise op per layer.
See benchmarks/RESULTS.md for the speeds and for perplexity and greedy-token agreement against fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows beyond which one matmul by the dequantized weight beats the int8 kernel, by compute dtype
# (GPT-2 124M's layers on 2 cores: in bf16 with native bf16 from about 32 rows; in fp32 from 64
# with AVX2 kernels and from 128 with AVX-512).
FEW_ROWS = {torch.bfloat16: 32, torch.float32: 64}
# The kernel's AVX-512 path reads each row in blocks of 16 and, for other widths, returns garbage or
# crashes (torch 2.13): layers of other input widths stay as they are.
IN_MULTIPLE = 16


class Int8Linear(nn.Module):
    """`x @ weight.T + bias` with `weight` stored as int8 rows and one scale per row, less its input
    column of largest magnitude, which is kept exact in the compute dtype beside it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        weight = weight.detach().float()
        self.column = int(weight.abs().amax(dim=0).argmax())
        # contiguous: a column of the fp32 weight is a strided view that would keep the whole matrix alive
        self.register_buffer("exact", weight[:, self.column].to(dtype).contiguous())
        weight = weight.index_fill(1, torch.tensor([self.column]), 0)
        scale = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp(min=1e-8) / 127  # absmax
        self.register_buffer("weight", torch.div(weight, scale[:, None]).round_().to(torch.int8).contiguous())
        # The kernel takes scales in its input's dtype, bf16. They are kept as their bits (int16), so
        # that `model.to(dtype)`, which converts every floating-point tensor, leaves them bf16.
        self.register_buffer("scale_bits", scale.to(torch.bfloat16).view(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, scale = x.reshape(-1, x.shape[-1]), self.scale_bits.view(torch.bfloat16)
        if flat.shape[0] > FEW_ROWS.get(x.dtype, 32):
            out = F.linear(flat, self.weight.to(x.dtype) * scale.to(x.dtype)[:, None])
        else:
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, scale).to(x.dtype)
        out.addcmul_(flat[:, self.column:self.column + 1], self.exact)  # the exact column's share
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every linear layer (and HF GPT-2's transposed Conv1D) for an `Int8Linear`, in place;
    `dtype` is the model's compute dtype (fp32 or bf16).

    Embeddings stay as they are, so a head tied to the input embedding gets its own int8 copy.
    Layers whose input width is not a multiple of `IN_MULTIPLE` stay as they are too.
    Conv1D is known by its class name: importing transformers costs penwright's own engine
    (engine.py, which also calls this) its fast start.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                weight = child.weight
            elif type(child).__name__ == "Conv1D":  # stores (in, out): transpose to (out, in)
                weight = child.weight.T
            else:
                continue
            if weight.shape[1] % IN_MULTIPLE == 0:
                setattr(parent, name, Int8Linear(weight, child.bias, dtype))
    return model
