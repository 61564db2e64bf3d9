"""Fused output projection + weighted cross-entropy whose gradients are made in the forward pass.

``weighted_linear_cross_entropy(h, weight, bias, targets, token_weights, chunk)`` returns
``(sum_i token_weights_i * nll_i, nll)`` for ``logits = h @ weight.T + bias`` without ever holding
more than ``chunk x V`` logits. The objectives' weights do not depend on the parameters, so the
gradient of the weighted sum is known while each chunk's logits exist:

    dL/dlogits_i = token_weights_i * (softmax(logits_i) - onehot(targets_i))
    dL/dh_i      = dL/dlogits_i @ weight            dL/dweight = sum_i dL/dlogits_i^T h_i

The forward computes these chunk by chunk and keeps only ``dL/dh`` ([N, d]) and ``dL/dweight``,
``dL/dbias`` ([V, d], [V], float32 sums); backward multiplies them by the upstream scalar. So a
training step does the dense path's three matmuls (no recomputation, unlike checkpointed chunks)
and saves no ``N x V`` tensor for backward. ``nll`` is returned detached (for metrics): the
gradient flows through the weighted sum only. Without gradients (validation) nothing is stored.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


def _fused(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_weights: Tensor, chunk: int,
           need: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(weighted sum, nll, dsum/dh, dsum/dweight, dsum/dbias), a gradient only where ``need`` says."""
    n = h.shape[0]
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
    nll = torch.empty(n, dtype=torch.float32, device=h.device)
    token_weights = token_weights.float()  # once, not per chunk
    rows = torch.arange(min(chunk, n), device=h.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        h_c, t_c, r = h[start:stop], targets[start:stop], rows[: stop - start]
        logits = _chunk_logits(h_c, weight, bias)
        lse = torch.logsumexp(logits, dim=-1)
        nll[start:stop] = lse - logits[r, t_c]
        if not (need_h or need_w or need_b):
            continue
        g = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' memory
        g[r, t_c] -= 1
        g.mul_(token_weights[start:stop, None])
        if need_b:
            grad_b += g.sum(0)
        g = g.to(h.dtype)
        if need_h:
            torch.mm(g, weight, out=grad_h[start:stop])
        if need_w:
            if h.dtype == torch.float32:
                grad_w.addmm_(g.t(), h_c)
            else:  # a bf16/fp16 matmul per chunk, summed in float32
                grad_w += (g.t() @ h_c).float()
    return (token_weights * nll).sum(), nll, grad_h, grad_w, grad_b


class _WeightedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_weights: Tensor,
                chunk: int) -> tuple[Tensor, Tensor]:
        total, nll, grad_h, grad_w, grad_b = _fused(h, weight, bias, targets, token_weights, chunk,
                                                   ctx.needs_input_grad[:3])
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(nll)
        return total, nll

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_nll: Tensor | None):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_total).to(weight_dtype),
                None if grad_b is None else (grad_b * grad_total).to(bias_dtype),
                None, None, None)


def weighted_linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                  token_weights: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """h [N, d], weight [V, d], bias [V] or None, targets [N] (long), token_weights [N] (no gradient),
    chunk > 0 tokens -> (float32 scalar ``sum_i token_weights_i nll_i`` with gradients to h, weight
    and bias; float32 nll [N], detached)."""
    if token_weights.requires_grad:
        raise ValueError("the per-token weights of the fused cross-entropy must not require gradients")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if not torch.is_grad_enabled():  # validation: the same chunked loop, no gradients made or kept
        total, nll, *_ = _fused(h, weight, bias, targets, token_weights, chunk, (False, False, False))
        return total, nll
    return _WeightedLinearCrossEntropy.apply(h, weight, bias, targets, token_weights, chunk)
