"""penwright's own GPT-2, for writing only: no training, no dropout, no transformers.

It reads an HF GPT-2 model directory (config.json + model.safetensors) with `json` and
`safetensors`, so `penwright generate` starts without importing transformers' model code (seconds
on a small CPU). `Stepper` writes a batch: prefill the prompts once, then one token per step into
a static KV cache allocated for the whole batch up front. `generate.load` picks this engine for
the models `unsupported` accepts and transformers for the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
    def from_hf(cls, hf: dict) -> "GPTConfig":
        return cls(hf["vocab_size"], hf["n_positions"], hf["n_embd"], hf["n_layer"], hf["n_head"],
                   hf.get("n_inner") or 4 * hf["n_embd"], hf.get("layer_norm_epsilon", 1e-5),
                   GELU[hf.get("activation_function", "gelu_new")])


def unsupported(spec: str) -> str | None:
    """Why this engine cannot write with `spec`, or None when it can."""
    from .lora import is_adapter

    path = Path(spec).expanduser()
    if not path.is_dir():
        return "it reads local model directories only, not hub ids or .gguf files"
    if is_adapter(path):
        return "it is a LoRA run, whose adapter is merged into its base model by transformers"
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "there is no readable config.json"
    checks = {
        f"model_type is {hf.get('model_type')!r}, not 'gpt2'": hf.get("model_type") == "gpt2",
        "config.json lacks GPT-2 shape fields": all(k in hf for k in ("vocab_size", "n_positions", "n_embd",
                                                                       "n_layer", "n_head")),
        f"activation_function {hf.get('activation_function')!r} is not implemented":
            hf.get("activation_function", "gelu_new") in GELU,
        "scale_attn_weights false or scale_attn_by_inverse_layer_idx is not implemented":
            hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
        "cross-attention (add_cross_attention) is not implemented": not hf.get("add_cross_attention", False),
        "there is no model.safetensors (sharded or pickled weights are not read)":
            (path / "model.safetensors").is_file(),
        "there is no tokenizer.json": (path / "tokenizer.json").is_file(),
    }
    return next((reason for reason, ok in checks.items() if not ok), None)


# --- the model --------------------------------------------------------------------------------

class Loaded:
    """No random initialisation: every weight comes from the checkpoint. (Building on the meta
    device instead would import torch._dynamo, a second on a small CPU.)"""

    def reset_parameters(self):
        pass


class Linear(Loaded, nn.Linear):
    pass


class Embedding(Loaded, nn.Embedding):
    pass


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = Linear(c.n_embd, c.n_embd)

    def forward(self, x, kv=None, start: int = 0, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if kv is not None:  # write this step's keys and values in place, attend to everything so far
            kv[0][:, :, start:start + T] = k
            kv[1][:, :, start:start + T] = v
            q, k, v = q.to(kv[0].dtype), kv[0][:, :, :start + T], kv[1][:, :, :start + T]
        # is_causal only ever applies to a prefill from position 0; one new token sees all the cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.c_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = Linear(c.n_embd, c.n_inner)
        self.c_proj = Linear(c.n_inner, c.n_embd)
        self.gelu = c.gelu

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x, kv=None, start: int = 0, mask=None):
        x = x + self.attn(self.ln_1(x), kv, start, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 under HF's parameter names (less the `transformer.` prefix), with Linear layers."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position of unpadded rows `idx` (B, T), without a cache (perplexity, tests)."""
        positions = torch.arange(idx.size(1), device=idx.device)
        return self.lm_head(self.ln_f(self.body(idx, positions)))

    def body(self, idx, positions, cache=None, start: int = 0, mask=None) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(positions)
        for block, kv in zip(self.h, cache or [None] * len(self.h)):
            x = block(x, kv, start, mask)
        return x


def load(path: str, dtype: torch.dtype = torch.float32, int8: bool = False) -> GPT:
    """The GPT-2 in HF model directory `path` (see `unsupported`), weights in `dtype` or int8."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    config = GPTConfig.from_hf(json.loads((path / "config.json").read_text()))
    state = {}
    for name, tensor in load_file(path / "model.safetensors").items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).float().contiguous()
    state.setdefault("lm_head.weight", state["wte.weight"])  # tied to the input embedding
    model = GPT(config)
    model.load_state_dict(state, assign=True)
    if int8:  # quantized from the stored weights, before any rounding to bf16
        from .quantize import quantize_int8

        quantize_int8(model, dtype)
    return model.to(dtype).eval().requires_grad_(False)


# --- writing ----------------------------------------------------------------------------------

class Stepper:
    """One batch of writing: a static KV cache per layer, each row's positions and its padding.

    Rows are left-padded to one width; with padding, a boolean mask keeps each row to its own
    tokens, and without it (every prompt the same length) SDPA runs unmasked.
    """

    def __init__(self, model: GPT):
        self.model = model

    def first(self, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
        """Prefill prompts `ids` (B, W) with padding `mask`; logits for the next token (B, vocab)."""
        m, (B, W) = self.model, ids.shape
        c = m.config
        shape = (B, c.n_head, W + steps, c.n_embd // c.n_head)
        # fp32 on CPU, whose bf16 attention kernels run several times slower than fp32's
        dtype = torch.float32 if ids.device.type == "cpu" else m.wpe.weight.dtype
        self.cache = [(ids.new_empty(shape, dtype=dtype), ids.new_empty(shape, dtype=dtype)) for _ in m.h]
        valid = mask.bool()
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.length = W
        self.keys, attend = None, None
        if not valid.all():
            self.keys = F.pad(valid, (0, steps), value=True)[:, None, None, :]  # which cache slots each row sees
            causal = torch.ones(W, W, dtype=torch.bool, device=ids.device).tril()
            # a padding position sees itself: PyTorch before 2.5 makes NaNs of a row that sees nothing
            attend = causal & self.keys[..., :W] | torch.eye(W, dtype=torch.bool, device=ids.device)
        return self._logits(m.body(ids, self.positions, self.cache, 0, attend))

    def next(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B, 1); logits for the one after it."""
        self.positions = self.positions[:, -1:] + 1
        mask = None if self.keys is None else self.keys[..., :self.length + 1]
        x = self.model.body(ids, self.positions, self.cache, self.length, mask)
        self.length += 1
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.ln_f(x[:, -1]))  # the last position only
