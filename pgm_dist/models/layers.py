"""Blocks shared by the PGM and MDLM networks: RoPE, adaLN-zero blocks, output layer."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pgm_dist.attention.interface import AttentionMask, attend
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.linear_ce import weighted_linear_cross_entropy

Rope = tuple[Tensor, Tensor]  # cos, sin: [B or 1, 1, L, head_dim] float32


class Rotary(nn.Module):
    """Rotary embeddings over the full head dim, half-split ("NeoX") layout.

    The frequencies are computed in float32 at every call rather than kept in a buffer:
    ``model.to(torch.bfloat16)`` would round a floating buffer (up to 0.45 rad of angle
    error at distance 1023 for head dim 64), and the model would see other positions
    than it was trained with.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: Tensor) -> Rope:
        """positions: [B, L] (or [1, L]) integer positions -> cos, sin [B, 1, L, head_dim] float32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        angles = positions.float()[..., None] * self.base ** -exponents  # [B, L, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, rope: Rope) -> Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def token_embedding(num_tokens: int, d_model: int) -> nn.Embedding:
    """The reference's initialisation, uniform in +-1/sqrt(d) (std 1/sqrt(3 d)), not N(0, 1).

    With adaLN-zero gates the residual stream starts as the embedding: at N(0, 1) it
    would start ~50x larger than the blocks' updates can move at a normal learning rate.
    """
    embed = nn.Embedding(num_tokens, d_model)
    nn.init.kaiming_uniform_(embed.weight, a=math.sqrt(5))
    return embed


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal embedding: positions [B, L] -> [B, L, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def adaln_modulation(config: ModelConfig, out_dim: int) -> nn.Sequential:
    """``SiLU -> Linear(cond_dim, out_dim)`` (text), or the linear on the raw conditioning
    (``cond_silu=False``: the reference's image model); the same state-dict keys either way."""
    return nn.Sequential(nn.SiLU() if config.cond_silu else nn.Identity(), nn.Linear(config.cond_dim, out_dim))


class MultiHeadAttention(nn.Module):
    """Attention from a query stream to a key/value stream (the same one for self-attention)."""

    def __init__(self, config: ModelConfig, bias: bool = False):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.backend = config.attention
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.kv_proj = nn.Linear(d, 2 * d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, d] -> [B, H, L, D]
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor, q_rope: Rope, k_rope: Rope, mask: AttentionMask) -> Tensor:
        q = apply_rotary(self._heads(self.q_proj(x)), q_rope)
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        k = apply_rotary(self._heads(k), k_rope)
        out = attend(q, k, self._heads(v), mask, self.backend)  # [B, H, Lq, D]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation.

    Self-attention when called without ``memory``; cross-attention only (the PGM
    decoder) when given the encoder output as ``memory``.
    """

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        d = config.d_model
        self.norm_attn = nn.LayerNorm(d, elementwise_affine=False)
        self.norm_memory = nn.LayerNorm(d) if cross else None
        self.attn = MultiHeadAttention(config)
        self.norm_mlp = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_ratio * d, d)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.modulation = adaln_modulation(config, 6 * d)
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor, q_rope: Rope, mask: AttentionMask,
                memory: Tensor | None = None, k_rope: Rope | None = None) -> Tensor:
        """x: [B, Lq, d]; c: [B or 1, cond_dim]; memory: [B, Lk, d] for cross-attention."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None].chunk(6, dim=-1)
        h = modulate(self.norm_attn(x), shift_a, scale_a)
        if memory is None:
            attn = self.attn(h, h, q_rope, q_rope, mask)
        else:
            attn = self.attn(h, self.norm_memory(memory), q_rope, k_rope, mask)
        x = x + gate_a * self.dropout(attn)
        h = modulate(self.norm_mlp(x), shift_m, scale_m)
        return x + gate_m * self.dropout(self.mlp(h))


class Conditioning(nn.Module):
    """adaLN conditioning vector: a learned constant (text) or a class embedding.

    With classes, label ``num_classes`` is the null label used for classifier-free guidance.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.num_classes:
            self.classes = nn.Embedding(config.num_classes + 1, config.cond_dim)
            self.constant = None
        else:
            self.classes = None
            self.constant = nn.Parameter(torch.randn(config.cond_dim))

    def forward(self, labels: Tensor | None = None) -> Tensor:
        """-> [B, cond_dim] for labels [B], else [1, cond_dim]."""
        if self.classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional: pass no labels")
            return self.constant[None]
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        return self.classes(labels)


class OutputLayer(nn.Module):
    """LayerNorm + adaLN modulation + an untied projection to the vocabulary, zero at init.

    With ``targets`` it returns the per-token NLL instead of the logits, computed over
    ``config.loss_chunk`` tokens at a time (0: all at once): each chunk's float32 logits
    live only inside its own forward, and its backward recomputes them (non-reentrant
    checkpoint), so memory grows with ``loss_chunk x V``, not ``B x L x V``. With ``targets``
    and per-token ``weights`` it returns the scalar ``sum(weights * nll)``: chunked, by default
    the fused op (``models/linear_ce.py``), whose forward makes each chunk's gradients so that
    backward recomputes nothing (``config.fused_loss``). Both stay inside this module's forward
    because ZeRO-3 holds ``proj``'s weights only there.
    """

    def __init__(self, config: ModelConfig, out_dim: int):
        super().__init__()
        d = config.d_model
        self.loss_chunk = config.loss_chunk
        self.fused_loss = config.fused_loss
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.modulation = adaln_modulation(config, 2 * d)
        self.proj = nn.Linear(d, out_dim)
        for layer in (self.modulation[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor, targets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """x: [B, L, d]; c: [B or 1, cond_dim]; targets: LongTensor[B, L] or None; weights: [B, L] or None
        (constants: no gradient flows to them).

        Returns float32 logits [B, L, out_dim] without targets, float32 NLL [B, L] (nats) with
        targets, the float32 scalar ``sum(weights * nll)`` with targets and weights.
        """
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        if targets is None:
            return self.proj(h).float()
        if targets.shape != h.shape[:-1]:
            raise ValueError(f"targets {tuple(targets.shape)} do not match the tokens {tuple(h.shape[:-1])}")
        if weights is not None:
            if weights.shape != targets.shape:
                raise ValueError(f"weights {tuple(weights.shape)} do not match the targets {tuple(targets.shape)}")
            if self.loss_chunk and self.fused_loss:
                return weighted_linear_cross_entropy(h.flatten(0, 1), self.proj.weight, self.proj.bias,
                                                     targets.flatten(), weights.flatten(), self.loss_chunk)[0]
            return (weights * self._token_nll(h, targets)).sum()
        return self._token_nll(h, targets)

    def _token_nll(self, h: Tensor, targets: Tensor) -> Tensor:
        """Per-token NLL [B, L], in ``loss_chunk`` chunks recomputed in backward (0: all at once)."""
        if not self.loss_chunk:
            return self._nll(h, targets)
        nll_of = partial(checkpoint, self._nll, use_reentrant=False) if torch.is_grad_enabled() else self._nll
        parts = zip(h.flatten(0, 1).split(self.loss_chunk), targets.flatten().split(self.loss_chunk))
        return torch.cat([nll_of(h_part, t_part) for h_part, t_part in parts]).view(targets.shape)

    def _nll(self, h: Tensor, targets: Tensor) -> Tensor:
        """-log p(targets): h [..., d], targets [...] -> float32 [...]."""
        logits = self.proj(h).float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def run_blocks(blocks: nn.ModuleList, x: Tensor, checkpointed: bool, *args, **kwargs) -> Tensor:
    """``x = block(x, *args, **kwargs)`` for each block; with ``checkpointed``, each block
    keeps only its input for backward and recomputes the rest there (non-reentrant,
    RNG state kept, so dropout draws the same masks). Only where gradients are taken."""
    checkpointed = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False, **kwargs) if checkpointed else block(x, *args, **kwargs)
    return x


def positions_like(tokens: Tensor) -> Tensor:
    """[1, L] positions 0..L-1 for a full-length input."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None]


__all__ = [
    "Block", "Conditioning", "MultiHeadAttention", "adaln_modulation", "OutputLayer", "Rotary", "apply_rotary",
    "modulate", "positions_like", "run_blocks", "sinusoid", "token_embedding",
]
