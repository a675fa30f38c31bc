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
`penwright serve` goes further where the CPU multiplies int8 by int8 exactly (VNNI or AMX): the
activations become int8 too, through oneDNN with the weights packed once (`int8_activations`).
The weight-only kernel's time grows with the rows, since each row is its own fp32 dot products;
int8 x int8 does four times the products per instruction, so a batch of 16 rows costs 2.5x one
row instead of 3.6x, and one row alone no more than before. Its sums are exact integers whatever
the rows, so a row's numbers still do not depend on its company.
See benchmarks/RESULTS.md for the speeds and for perplexity and greedy-token agreement against fp32.
"""

from __future__ import annotations

import functools

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
        self.register_buffer("packed", None)  # the weight packed for oneDNN, by `take_int8_activations`

    def take_int8_activations(self) -> None:
        """Multiply int8 activations by the weight from now on (see `int8_activations`)."""
        scale = self.scale_bits.view(torch.bfloat16).float()
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(self.weight, None))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("zero_points", torch.zeros(scale.numel(), dtype=torch.int64))
        del self.weight  # the packed copy replaces it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, scale = x.reshape(-1, x.shape[-1]), self.scale_bits.view(torch.bfloat16)
        if self.packed is not None:
            out = self._by_int8_activations(flat).to(x.dtype)
        elif flat.shape[0] > FEW_ROWS.get(x.dtype, 32):
            out = F.linear(flat, self.weight.to(x.dtype) * scale.to(x.dtype)[:, None])
        else:
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, scale).to(x.dtype)
        out.addcmul_(flat[:, self.column:self.column + 1], self.exact)  # the exact column's share
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _by_int8_activations(self, flat: torch.Tensor) -> torch.Tensor:
        """Each row as two int8 rows: its values at 1/127 of its largest, and their rounding error at
        1/127 of that, so each activation keeps about 14 bits (SmolLM2's perplexity is the weight-only
        path's to 0.02%). One product for both rows of every row; their fp32 results are exact
        integers times the weight's scales, summed back with the row's scale."""
        rows = flat.float()
        step = rows.abs().amax(1, keepdim=True).clamp_(min=1e-30).div_(127)  # (abs-amax: 20x an inf-norm's speed)
        values = rows / step
        high = values.round()
        low = values.sub_(high).mul_(127).round_()
        q = torch.cat([high, low]).add_(128).to(torch.uint8)  # unsigned, zero point 128: oneDNN's fast kernels
        out = _int8_product(q, self.packed, self.weight_scale, self.zero_points)
        return torch.add(out[:len(flat)], out[len(flat):], alpha=1 / 127).mul_(step)


def _int8_product(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_points: torch.Tensor
                  ) -> torch.Tensor:
    """(q - 128) @ weight.T times the weight's per-row scale, in fp32, by oneDNN (signed q takes a
    reference kernel 1,000x slower)."""
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, scale, zero_points, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.cache
def exact_int8_products() -> bool:
    """Whether oneDNN multiplies int8 by pre-packed int8 exactly on this CPU: those with VNNI or AMX.
    Other kernels sum pairs of products in 16 bits, and their sums come back off by up to 1e5."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (4, 256), generator=g, dtype=torch.int8)
    weight[0], q[0] = 127, 127  # the largest pairs of products: where 16-bit sums saturate
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        out = _int8_product((q.int() + 128).to(torch.uint8), packed, torch.ones(64), torch.zeros(64, dtype=torch.int64))
    except RuntimeError:
        return False
    return torch.equal(out.double(), q.double() @ weight.double().T)  # below 2**24: exact in fp32


def int8_activations(model: nn.Module) -> int:
    """Switch `model`'s CPU `Int8Linear` layers to int8 activations where `exact_int8_products`;
    how many were switched (0 elsewhere). For continuous batching (`penwright serve`): at one row
    with all of a CPU's threads the weight-only kernel stays faster, so `penwright generate` keeps it."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.packed is None and m.exact.is_cpu]
    if not layers or not exact_int8_products():
        return 0
    for layer in layers:
        layer.take_int8_activations()
    return len(layers)


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


def has_int8_activations(model: nn.Module) -> bool:
    """Whether `int8_activations` switched any of `model`'s layers."""
    return any(isinstance(m, Int8Linear) and m.packed is not None for m in model.modules())
