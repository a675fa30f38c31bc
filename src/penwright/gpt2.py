"""GPT-2 in penwright's engine (engine.py): its config, its blocks and its weight names.

It reads an HF GPT-2 folder (config.json + safetensors) with `json` and `safetensors`, so
`penwright generate` starts without importing transformers' model code (seconds on a small CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Embedding, Linear, Model, Shape, Step, attend, build, read_config

MODEL_TYPES = ("gpt2",)
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> F.gelu's approximate
CONV1D = tuple(f".{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))  # stored (in, out)


@dataclass
class GPTConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    gelu: str  # F.gelu's `approximate`

    @classmethod
    def from_hf(cls, hf: dict) -> GPTConfig:
        return cls(hf["vocab_size"], hf["n_positions"], hf["n_embd"], hf["n_layer"], hf["n_head"],
                   hf.get("n_inner") or 4 * hf["n_embd"], hf.get("layer_norm_epsilon", 1e-5),
                   GELU[hf.get("activation_function", "gelu_new")])

    @property
    def shape(self) -> Shape:
        return Shape(self.vocab_size, self.n_positions, self.n_layer, self.n_head, self.n_embd // self.n_head)


def unsupported(hf: dict) -> str | None:
    """Why the engine cannot run the GPT-2 of config `hf`, or None when it can."""
    checks = {
        "config.json lacks GPT-2 shape fields": all(k in hf for k in ("vocab_size", "n_positions", "n_embd",
                                                                       "n_layer", "n_head")),
        f"activation_function {hf.get('activation_function')!r} is not implemented":
            hf.get("activation_function", "gelu_new") in GELU,
        "scale_attn_weights false or scale_attn_by_inverse_layer_idx is not implemented":
            hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
        "cross-attention (add_cross_attention) is not implemented": not hf.get("add_cross_attention", False),
    }
    return next((reason for reason, ok in checks.items() if not ok), None)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = c.n_head, layer
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        return self.c_proj(attend(q, k, v, step, self.layer).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = Linear(c.n_embd, c.n_inner)
        self.c_proj = Linear(c.n_inner, c.n_embd)
        self.gelu = c.gelu

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


class GPT(Model):
    """GPT-2 under HF's parameter names, less the `transformer.` prefix, with `h` as `layers` and
    `ln_f` as `norm`, and Linear layers for HF's transposed Conv1D."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config, self.shape = config, config.shape
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.n_positions, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        return self.wte(ids) + self.wpe(step.positions)


def load(path: str, dtype: torch.dtype = torch.float32, int8: bool = False) -> GPT:
    """The GPT-2 in HF model directory `path` (see `unsupported`), weights in `dtype` or int8."""
    path = Path(path).expanduser()
    return build(path, GPT(GPTConfig.from_hf(read_config(path))), _weights, dtype, int8)


def _weights(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in stored.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        name = "layers." + name[2:] if name.startswith("h.") else name.replace("ln_f.", "norm.")
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    state.setdefault("lm_head.weight", state["wte.weight"])  # tied to the input embedding
    return state
