"""Cross-entropy of the language-model head, computed a chunk of tokens at a time.

GPT-2's head maps every token to 50,257 scores: for a batch of 4 x 512 tokens that is 400 MB of
fp32 logits, written and read several times over by a plain `cross_entropy` (softmax, its
saved output, its gradient). Here each chunk's logits live only long enough to give its loss
and, when training, the gradients of the hidden states and the head weight, so backward has
nothing left to recompute and memory holds one chunk of logits instead of all of them.
"""

from __future__ import annotations

import torch

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
    return loss, grad_hidden, grad_weight
