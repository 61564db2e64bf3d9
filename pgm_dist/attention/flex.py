"""FlexAttention backend: a block mask built from the group ids, compiled kernels.

Tiles with no allowed pair are skipped by FlexAttention itself. PyTorch has no
FlexAttention backward on the CPU; there this backend computes its gradients with
:func:`dense_attention_backward` (the flash-attention backward equations on the
dense score matrix), so CPU training and tests still work.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from pgm_dist.attention.interface import AttentionMask, register_backend

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    flex_attention = None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(mask: AttentionMask):
    if mask.mode == "full":
        lengths = mask.key_lengths
        return lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]
    groups = mask.groups
    if mask.mode == "same_group":
        return lambda b, h, q_idx, kv_idx: groups[b, q_idx] == groups[b, kv_idx]
    return lambda b, h, q_idx, kv_idx: groups[b, q_idx] != groups[b, kv_idx]


def _block_mask(mask: AttentionMask, q: Tensor, k: Tensor):
    if mask.is_dense:
        return None
    batch = mask.groups.shape[0] if mask.groups is not None else mask.key_lengths.shape[0]
    return mask.cached(
        ("flex", q.shape[-2], k.shape[-2]),
        lambda: create_block_mask(_mask_mod(mask), batch, None, q.shape[-2], k.shape[-2], device=q.device),
    )


def dense_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor,
                             allowed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of masked softmax attention (fp32 math), rows without keys giving zero.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; out, grad_out: [B, H, Lq, D];
    allowed: [B or 1, 1, Lq, Lk] bool.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, of, gf = (t.float() for t in (q, k, v, out, grad_out))
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(scores - row_max)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)  # all-zero rows stay zero
    grad_v = p.transpose(-1, -2) @ gf
    grad_p = gf @ vf.transpose(-1, -2)
    delta = (gf * of).sum(-1, keepdim=True)  # = rowsum(P * dP)
    grad_s = p * (grad_p - delta) * scale
    grad_q = grad_s @ kf
    grad_k = grad_s.transpose(-1, -2) @ qf
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class _FlexWithDenseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = _compiled_flex()(q.detach(), k.detach(), v.detach(), block_mask=_block_mask(mask, q, k))
        ctx.save_for_backward(q, k, v, out)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        allowed = ctx.mask.allowed(q.shape[-2], k.shape[-2], q.device)
        return (*dense_attention_backward(q, k, v, out, grad_out, allowed), None)


def flex_backend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        return _FlexWithDenseBackward.apply(q, k, v, mask)
    return _compiled_flex()(q, k, v, block_mask=_block_mask(mask, q, k))


register_backend("flex", flex_backend, available=lambda: flex_attention is not None)
