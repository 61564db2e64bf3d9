"""Reference backend: a dense boolean mask and PyTorch's SDPA, as the paper's code does.

It pays the full ``Lq x Lk`` score matrix whatever the mask; it is the oracle the
other backends are tested against.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pgm_dist.attention.interface import AttentionMask, register_backend


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    if mask.is_dense:
        return F.scaled_dot_product_attention(q, k, v)
    safe, no_key = mask.cached(("sdpa", q.shape[-2], k.shape[-2]), lambda: _safe_mask(mask, q, k))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return out.masked_fill(no_key, 0.0)


def _safe_mask(mask: AttentionMask, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Rows without a visible key would give NaN in softmax: let them see every key,
    and report them so their output (and so their gradient) is zeroed."""
    allowed = mask.allowed(q.shape[-2], k.shape[-2], q.device)  # [B, 1, Lq, Lk]
    no_key = ~allowed.any(-1, keepdim=True)  # [B, 1, Lq, 1]
    return allowed | no_key, no_key


register_backend("reference", reference_attention)
