"""The Llama family in penwright's engine (engine.py): Llama, Mistral and Qwen2 folders.

RMSNorm, rotary position embeddings (the rope types `ROPE` lists, as transformers computes
them), grouped-query attention, a SwiGLU MLP, a tied or untied head, the optional biases of
Llama's `attention_bias` / `mlp_bias` and Qwen2's query/key/value, and Mistral's and Qwen2's
sliding windows. The query, key and value projections are fused into one matrix, and so are the
MLP's gate and up projections: fewer, larger matmuls per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Embedding, Linear, Model, Shape, Step, attend, build, read_config

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE = ("default", "linear", "dynamic", "llama3", "yarn")  # transformers' rope_type names


@dataclass
class LlamaConfig:
    vocab_size: int
    context: int  # max_position_embeddings
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    windows: list  # each layer's sliding window, None for full attention
    rope: dict  # transformers' rope_parameters: rope_type, rope_theta, factor, ...

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        heads, layers, hidden = hf["num_attention_heads"], hf["num_hidden_layers"], hf["hidden_size"]
        bias = hf.get("attention_bias", False)  # Qwen2 always has query/key/value biases
        return cls(vocab_size=hf["vocab_size"], context=hf.get("max_position_embeddings", 2048),
                   hidden=hidden, layers=layers, heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hidden // heads, intermediate=hf["intermediate_size"],
                   eps=hf.get("rms_norm_eps", 1e-6), tied=hf.get("tie_word_embeddings", False),
                   qkv_bias=bias or hf["model_type"] == "qwen2", o_bias=bias,
                   mlp_bias=hf.get("mlp_bias", False), windows=_windows(hf, layers), rope=rope_parameters(hf))

    @property
    def shape(self) -> Shape:
        return Shape(self.vocab_size, self.context, self.layers, self.kv_heads, self.head_dim)


def _windows(hf: dict, layers: int) -> list:
    """Sliding windows as transformers applies them: Mistral's on every layer, Qwen2's on the layers
    its layer_types mark (or from max_window_layers on) and only with use_sliding_window."""
    window = hf.get("sliding_window")
    if hf["model_type"] == "mistral":
        return [window] * layers
    if hf["model_type"] != "qwen2" or not hf.get("use_sliding_window") or window is None:
        return [None] * layers
    first = hf.get("max_window_layers", 28)
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= first else "full" for i in range(layers)]
    return [window if kind == "sliding_attention" else None for kind in kinds]


def rope_parameters(hf: dict) -> dict:
    """transformers 5's `rope_parameters`, also from older configs' rope_theta + rope_scaling."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return rope


def unsupported(hf: dict) -> str | None:
    """Why the engine cannot run the model of config `hf`, or None when it can."""
    rope = rope_parameters(hf)
    heads = hf.get("num_attention_heads", 0)
    kv = hf.get("num_key_value_heads") or heads
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    checks = {
        "config.json lacks Llama shape fields": all(k in hf for k in shape),
        f"hidden_act {hf.get('hidden_act')!r} is not implemented (silu is)":
            hf.get("hidden_act", "silu") == "silu",
        f"rope_type {rope['rope_type']!r} is not implemented ({', '.join(ROPE)} are)":
            rope["rope_type"] in ROPE,
        "partial rotary embeddings (partial_rotary_factor) are not implemented":
            rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) == 1.0,
        "the attention heads do not divide into the key/value heads": heads > 0 and heads % kv == 0,
        "quantized checkpoints (quantization_config) are not read": "quantization_config" not in hf,
    }
    return next((reason for reason, ok in checks.items() if not ok), None)


# --- rotary position embeddings ---------------------------------------------------------------

class Rope:
    """Rotation angles by position, for the rope types in `ROPE`, with transformers' formulas
    (modeling_rope_utils.py). Dynamic NTK stretches the base once a row reaches past the trained
    context, from that row's furthest position in the pass (transformers takes the furthest of the
    whole batch, so its short rows change with their neighbours; here a row writes the same text
    alone or in a batch). Keys already cached keep the angles they were written with, as in
    transformers."""

    def __init__(self, c: LlamaConfig):
        self.rope, self.dim, self.context = c.rope, c.head_dim, c.context
        self.kind, self.theta = c.rope["rope_type"], c.rope["rope_theta"]
        self.scaling = 1.0  # yarn's attention factor, on cos and sin
        self.inv_freq = {"linear": self._linear, "llama3": self._llama3, "yarn": self._yarn}.get(
            self.kind, lambda: self._plain(self.theta))()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, head_dim) for `positions` (B, T)."""
        inv_freq = self.inv_freq.to(positions.device)[None]
        if self.kind == "dynamic":
            seq = positions.amax(-1, keepdim=True).float() + 1  # (B, 1)
            if (seq > self.context).any():
                factor = self.rope["factor"]
                stretch = (factor * seq / self.context - (factor - 1)).clamp(min=1)
                inv_freq = self._plain(self.theta * stretch ** (self.dim / (self.dim - 2)))
        freqs = positions[..., None].float() * inv_freq[:, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)

    def _plain(self, base) -> torch.Tensor:
        """Inverse frequencies for `base`, a number or a column of them (one per row)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        return 1.0 / (base ** exponents.to(base.device if torch.is_tensor(base) else "cpu"))

    def _linear(self) -> torch.Tensor:
        return self._plain(self.theta) / self.rope["factor"]

    def _llama3(self) -> torch.Tensor:
        r, inv_freq = self.rope, self._plain(self.theta)
        factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        old = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self) -> torch.Tensor:
        r, dim, base = self.rope, self.dim, self.theta
        old = r["original_max_position_embeddings"]
        factor = r.get("factor") or self.context / old

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        self.scaling = r.get("attention_factor") or (
            mscale(factor, r["mscale"]) / mscale(factor, r["mscale_all_dim"])
            if r.get("mscale") and r.get("mscale_all_dim") else mscale(factor))

        def correction(rotations):
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction(r.get("beta_fast") or 32), correction(r.get("beta_slow") or 1)
        if r.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


# --- the model --------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.empty(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.window = layer, c.windows[layer]
        self.split = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.head_dim = c.head_dim
        self.qkv = Linear(c.hidden, sum(self.split), bias=c.qkv_bias)
        self.o_proj = Linear(self.split[0], c.hidden, bias=c.o_bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(self.split, dim=-1))
        cos, sin = step.rope
        y = attend(rotate(q, cos, sin), rotate(k, cos, sin), v, step, self.layer, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_up = Linear(c.hidden, 2 * c.intermediate, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate, c.hidden, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(Model):
    """A Llama-family model under HF's parameter names, less the `model.` prefix, with the fused
    `self_attn.qkv` and `mlp.gate_up`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config, self.shape, self.rope = config, config.shape, Rope(config)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.eps)
        self.lm_head = Linear(config.hidden, config.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(ids)
        step.rope = self.rope.cos_sin(step.positions, x.dtype)
        return x


def load(path: str, dtype: torch.dtype = torch.float32, int8: bool = False) -> Llama:
    """The model in HF folder `path` (see `unsupported`), weights in `dtype` or int8."""
    path = Path(path).expanduser()
    config = LlamaConfig.from_hf(read_config(path))
    return build(path, Llama(config), lambda stored: _weights(stored, config), dtype, int8)


def _weights(stored: dict[str, torch.Tensor], c: LlamaConfig) -> dict[str, torch.Tensor]:
    state = {name.removeprefix("model."): t for name, t in stored.items() if "rotary_emb" not in name}
    for i in range(c.layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for part, present in (("weight", True), ("bias", c.qkv_bias)):
            if present:
                state[f"{attn}qkv.{part}"] = torch.cat([state.pop(f"{attn}{x}_proj.{part}") for x in "qkv"])
        for part, present in (("weight", True), ("bias", c.mlp_bias)):
            if present:
                pair = [state.pop(f"{mlp}{x}_proj.{part}") for x in ("gate", "up")]
                state[f"{mlp}gate_up.{part}"] = torch.cat(pair)
    if c.tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state
