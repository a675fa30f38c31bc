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
`penwright serve` goes further where the CPU multiplies int8 by int8 exactly: the activations become
int8 too, with the weights packed once (`int8_activations`), through oneDNN on CPUs with VNNI or
AMX, else FBGEMM on x86 CPUs from AVX2 on (`int8_products`). The weight-only kernel's time grows
with the rows, since each row is its own fp32 dot products; int8 x int8 does four times the
products per instruction, so a batch of 16 rows costs 2.5x one row instead of 3.6x, and one row
alone no more than before. Its sums are exact integers whatever the rows, so a row's numbers still
do not depend on its company. Where FBGEMM is the backend (no VNNI: the weight-only kernel's fp32
products are slowest there), `penwright generate` sends a batch's rows through it too, and keeps
the weight-only kernel for one row, faster alone.
See benchmarks/RESULTS.md for the speeds and for perplexity and greedy-token agreement against fp32.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

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
        self.packed: OneDNN | FBGEMM | None = None  # the weight packed for int8 activations (`int8_activations`)
        self.packed_from = 0  # fewest rows that take int8 activations: any, or 2 while the weight-only kernel is kept

    def take_int8_activations(self, backend: str, keep_weight: bool = False) -> None:
        """Multiply int8 activations by the weight from now on, through `backend` (see `int8_activations`);
        with `keep_weight`, a single row still goes to the weight-only kernel."""
        if self.packed is None:
            self.packed = BACKENDS[backend](self.weight, self.scale_bits.view(torch.bfloat16).float())
        self.packed_from = 2 if keep_weight else 0
        if not keep_weight:
            del self.weight  # the packed copy replaces it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, scale = x.reshape(-1, x.shape[-1]), self.scale_bits.view(torch.bfloat16)
        if self.packed is not None and len(flat) >= self.packed_from:
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
        """Each row as two int8 rows: its values at 1/levels of its largest (`levels`: what the backend
        multiplies exactly), and their rounding error at 1/127 of that, so each activation keeps about
        14 bits (13 with FBGEMM's 63 levels; SmolLM2's perplexity is the weight-only path's to 0.02%).
        One product for both rows of every row; their fp32 results are exact integers times the
        weight's scales, summed back with the row's scale."""
        rows = flat.float()
        largest = rows.abs().amax(1, keepdim=True)  # (abs-amax: 20x an inf-norm's speed)
        step = largest.clamp_(min=1e-30).div_(self.packed.levels)
        values = rows / step
        high = values.round()
        low = values.sub_(high).mul_(127).round_().clamp_(-64, 63)  # (+-64 only where the error is exactly 1/2)
        out = self.packed(high, low)
        return torch.add(out[:len(flat)], out[len(flat):], alpha=1 / 127).mul_(step)


class OneDNN:
    """oneDNN's int8 x int8 product, the weight packed once: exact where the CPU has VNNI or AMX.
    Its fast kernels take unsigned activations, here with zero point 128 (signed ones take a
    reference kernel 1,000x slower)."""

    levels = 127

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        self.weight = torch.ops.onednn.qlinear_prepack(weight, None)
        self.scale, self.zero_points = scale, torch.zeros(scale.numel(), dtype=torch.int64)

    def __call__(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """[high; low] @ weight.T times the weight's per-row scale, in fp32, for integer-valued rows."""
        q = torch.cat([high, low]).add_(128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.weight, self.scale, self.zero_points, None, 1.0, 0,
                                                  torch.float32, "none", [], "")


class FBGEMM:
    """FBGEMM's int8 product with activations quantized on the fly, on x86 CPUs from AVX2 on. Without
    VNNI its kernels sum pairs of unsigned x signed products in 16 bits, which cannot overflow with
    activations of 7 bits: "reduce range" (0..127). A last row pinning the activations' range to
    -64..63 makes that quantization the identity on integer rows (scale 1, zero point 64)."""

    levels = 63

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        with warnings.catch_warnings(), quantized_engine("fbgemm"):
            warnings.simplefilter("ignore")  # quantized tensors are deprecated: torch is pinned (constraints.txt)
            zeros = torch.zeros(scale.numel(), dtype=torch.int64)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zeros, 0)
            self.weight = torch.ops.quantized.linear_prepack(qweight, None)
        self.pins = torch.zeros(1, weight.shape[1])
        self.pins[0, 0], self.pins[0, -1] = -64, 63

    def __call__(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(torch.cat([high, low, self.pins]), self.weight, True)[:-1]


BACKENDS = {"onednn": OneDNN, "fbgemm": FBGEMM}


@contextlib.contextmanager
def quantized_engine(name: str):
    """PyTorch's quantized engine set to `name` while weights are packed (the packed weight keeps it)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def int8_products() -> str | None:
    """The backend for int8 activations on this CPU: "onednn" where it has VNNI or AMX, else "fbgemm"
    on other x86 CPUs from AVX2 on, else None (ARM, Apple, older x86)."""
    return next(iter(exact_backends()), None)


@functools.cache
def exact_backends() -> tuple[str, ...]:
    """The backends that multiply int8 activations by packed int8 weights exactly on this CPU: those
    whose sums come out exact at the largest pairs of products, where 16-bit sums would saturate
    (oneDNN's without VNNI are off by up to 1e5)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8)
    weight[0] = 127
    exact = []
    for name, backend in BACKENDS.items():
        high = torch.randint(-backend.levels, backend.levels + 1, (4, 256), generator=g).float()
        low = torch.randint(-64, 64, (4, 256), generator=g).float()
        high[0], low[0] = backend.levels, 63
        try:
            out = backend(weight, torch.ones(64))(high, low)
        except (RuntimeError, AttributeError):  # not built into this PyTorch, or not for this CPU
            continue
        if torch.equal(out.double(), torch.cat([high, low]).double() @ weight.double().T):  # below 2**24: exact in fp32
            exact.append(name)
    return tuple(exact)


def int8_activations(model: nn.Module, keep_weights: bool = False) -> int:
    """Switch `model`'s CPU `Int8Linear` layers to int8 activations where `int8_products` finds a
    backend; how many were switched (0 elsewhere). `penwright serve` (continuous batching) sends
    every row that way, so a row's numbers do not depend on its company; `keep_weights` keeps the
    weight-only kernel for single rows, faster alone, as `penwright generate` writes them."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.exact.is_cpu
              and (m.packed is None or m.packed_from > 1 and not keep_weights)]
    backend = int8_products() if layers else None
    if backend is None:
        return 0
    for layer in layers:
        layer.take_int8_activations(backend, keep_weights)
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
