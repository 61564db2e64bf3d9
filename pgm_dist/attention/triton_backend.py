"""Triton backend: fused partition attention that computes only the allowed tiles.

Used for ``same_group`` and ``cross_group`` masks; ``full`` masks (MDLM, the PGM
sampling path) have no partition inside and go to the ``reference`` backend: SDPA, on
its flash path on a GPU only without key lengths (a dense mask rules flash out).
Runs compiled on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slow, exact
semantics: how the kernels are tested without a GPU).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import Tensor

from pgm_dist.attention.interface import AttentionMask, register_backend
from pgm_dist.attention.reference import reference_attention

BLOCK = {"cuda": (64, 64), "cpu": (16, 16)}  # (BLOCK_M, BLOCK_N)


def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    from pgm_dist.attention import triton_kernels

    return triton_kernels


def group_sorted_layout(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Stable per-sequence permutation putting group 0 first: (perm [B, L] int32, n0 [B] int32).

    Sorted index ``i`` of sequence ``b`` is position ``perm[b, i]``; ``n0[b]`` positions are in group 0.
    """
    perm = torch.argsort(groups.to(torch.int8), dim=1, stable=True)
    n0 = (~groups).sum(dim=1)
    return perm.to(torch.int32).contiguous(), n0.to(torch.int32).contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PartitionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, perm, n0, same: bool):
        q, k, v = (t.contiguous() for t in (q, k, v))
        B, H, L, D = q.shape
        if D not in (16, 32, 64, 128):
            raise ValueError(f"the triton backend supports head dims 16, 32, 64 and 128, not {D}")
        out = torch.empty_like(q)
        lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
        block_m, block_n = BLOCK["cuda" if q.is_cuda else "cpu"]
        _kernels()._partition_fwd[(_cdiv(L, block_m), B * H)](
            q, k, v, out, lse, perm, n0, q.stride(0), q.stride(1), q.stride(2), lse.stride(0), L, H,
            1.0 / math.sqrt(D), SAME=same, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D)
        ctx.save_for_backward(q, k, v, out, lse, perm, n0)
        ctx.same = same
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, perm, n0 = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, H, L, D = q.shape
        delta = (grad_out.float() * out.float()).sum(-1).reshape(B * H, L).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_m, block_n = BLOCK["cuda" if q.is_cuda else "cpu"]
        common = (q.stride(0), q.stride(1), q.stride(2), lse.stride(0), L, H, 1.0 / math.sqrt(D))
        meta = dict(SAME=ctx.same, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D)
        kernels = _kernels()
        kernels._partition_bwd_dq[(_cdiv(L, block_m), B * H)](
            q, k, v, grad_out, dq, lse, delta, perm, n0, *common, **meta)
        kernels._partition_bwd_dkdv[(_cdiv(L, block_n), B * H)](
            q, k, v, grad_out, dk, dv, lse, delta, perm, n0, *common, **meta)
        return dq, dk, dv, None, None, None


@torch.compiler.disable  # a graph break: torch.compile of the rest of the model is unaffected
def triton_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    if mask.mode == "full":
        return reference_attention(q, k, v, mask)
    perm, n0 = mask.cached("group_sorted", lambda: group_sorted_layout(mask.groups.to(q.device)))
    return PartitionAttention.apply(q, k, v, perm, n0, mask.mode == "same_group")


register_backend("triton", triton_attention, available=triton_available)
