"""Cross-entropy of the language-model head, computed a chunk of tokens at a time.

GPT-2's head maps every token to 50,257 scores: for a batch of 4 x 512 tokens that is 400 MB of
fp32 logits, written and read several times over by a plain `cross_entropy` (softmax, its
saved output, its gradient). Here each chunk's logits live only long enough to give its loss
and, when training, the gradients of the hidden states and the head weight, so backward has
nothing left to recompute and memory holds one chunk of logits instead of all of them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_TOKENS = 1024  # 1024 x 50,257 fp32 scores = 200 MB at a time


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (IGNORE positions skipped).

    `hidden` is (tokens, dim), `weight` (vocab, dim), `targets` (tokens,). Matmuls run in the
    autocast dtype when autocast is on; the softmax is always fp32.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _chunks(hidden, weight, targets, grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        loss, grad_hidden, grad_weight = _chunks(hidden, weight, targets, grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None


def _chunks(hidden, weight, targets, grads: bool):
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    h, w = hidden.to(dtype), weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
    with torch.autocast(device, enabled=False):  # dtypes are chosen explicitly here
        for start in range(0, len(h), CHUNK_TOKENS):
            part = slice(start, start + CHUNK_TOKENS)
            logp = torch.log_softmax((h[part] @ w.T).float(), -1)
            target = targets[part].clamp(min=0)[:, None]
            keep = (targets[part] != IGNORE)[:, None]
            loss -= logp.gather(1, target).mul_(keep).sum()
            if grads:  # d(loss)/d(logits) = softmax - one_hot(target); ignored rows masked on the small sides
                dlogits = logp.exp_().scatter_add_(1, target, torch.full_like(logp[:, :1], -1)).to(dtype)
                grad_hidden[part] = (dlogits @ w).mul_(keep)
                grad_weight += (dlogits.T @ (h[part] * keep)).float()
                del dlogits
            del logp  # before the next chunk's logits: one chunk alive at a time, not two
    return loss, grad_hidden, grad_weight


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", fused: bool = True,
            positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy in fp32.

    `fused`: from the final hidden states through the head chunk by chunk (losses.py), never
    holding the whole logits, wherever the model allows it (`_head_weight`). `positions`: for
    packed conversations, restarting at each one; with no cache and no attention mask,
    transformers turns them into a block-diagonal causal mask (see `keeps_packed_apart`).
    """
    weight = _head_weight(model) if fused else None
    packed = {} if positions is None else {"position_ids": positions}
    if weight is None:
        logits = model(input_ids=x, use_cache=False, **packed).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction=reduction)
    # logits_to_keep=1: the model's own head scores only the last position, which costs nothing
    out = model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=1, **packed)
    total = linear_cross_entropy(out.hidden_states[-1].flatten(0, 1), weight, y.flatten())
    return total if reduction == "sum" else total / (y != IGNORE).sum()


def _head_weight(model) -> torch.Tensor | None:
    """The head's weight when the fused loss can use it: a bias-free linear head, not sharded
    (FSDP), on a model whose forward can skip computing logits (`logits_to_keep`)."""
    inner = getattr(model, "module", model)  # inside DistributedDataParallel
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or hasattr(head.weight, "placements"):
        return None
    return head.weight if "logits_to_keep" in inspect.signature(inner.forward).parameters else None


@torch.no_grad()
def keeps_packed_apart(model) -> bool:
    """Whether the model's attention stays inside each sequence of a packed row whose positions restart:
    the last of three short sequences must score the same packed as alone. A model that ignores the
    restarts would let packed conversations read each other."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = ((torch.arange(12, device=device) * 7919 + 1) % vocab)[None]  # + 1: not the padding 0
    positions = torch.arange(4, device=device).repeat(3)[None]
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=ids[:, 8:], use_cache=False).logits.float()
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 8:].float()
    except TypeError:  # a forward without position_ids
        return False
    finally:
        model.train(was_training)
    return torch.allclose(alone, packed, atol=1e-4, rtol=1e-3)
