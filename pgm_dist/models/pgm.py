"""Partition Generative Model (section 3 of docs/pgm-algorithm.md).

Encoder (same-group self-attention) -> GroupSwap (content-free queries attending the
other group) -> decoder (cross-attention only, to the final encoder output) -> logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgm_dist.attention.interface import AttentionMask
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.layers import (
    Block,
    Conditioning,
    MultiHeadAttention,
    OutputLayer,
    Rope,
    Rotary,
    positions_like,
    run_blocks,
    sinusoid,
    token_embedding,
)


class GroupSwap(nn.Module):
    """Decoder entry: ``q_i = Linear(LayerNorm(w + sinusoid(i)))`` attends the other group.

    The queries carry no token content, only their position; no residual inside.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_model = config.d_model
        # N(0, 1) like the reference's nn.Embedding(1, d) row: at init the seed weighs on the
        # query as much as the position does (sinusoid entries are in [-1, 1]); at 0.02 the
        # query would start as the position alone.
        self.query_seed = nn.Parameter(torch.randn(config.d_model))
        self.norm = nn.LayerNorm(config.d_model)
        self.attn = MultiHeadAttention(config, bias=config.swap_bias)

    def forward(self, query_positions: Tensor, memory: Tensor, q_rope: Rope, k_rope: Rope,
                mask: AttentionMask) -> Tensor:
        """query_positions: [B or 1, Q]; memory: [B, C, d] -> [B, Q, d]."""
        queries = self.norm(self.query_seed + sinusoid(query_positions, self.d_model).to(memory.dtype))
        queries = queries.expand(memory.shape[0], -1, -1)
        return self.attn(queries, memory, q_rope, k_rope, mask)


class RegisterTokens(nn.Module):
    """Two learned tokens, group 0's and group 1's (images): neither group is ever empty.

    A module, not a bare parameter, so that ZeRO-3 gathers it in its own forward.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(2, d_model) * 0.02)  # the reference's N(0, 0.02)

    def forward(self, batch: int, dtype: torch.dtype) -> Tensor:
        """-> [batch, 2, d]: group 0's register, then group 1's."""
        return self.tokens.to(dtype).expand(batch, -1, -1)


class PGM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = token_embedding(config.vocab_size, config.d_model)
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.cond = Conditioning(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc))
        self.group_swap = GroupSwap(config)
        self.decoder = nn.ModuleList(Block(config, cross=True) for _ in range(config.n_dec))
        self.output = OutputLayer(config, config.vocab_size)
        self.registers = RegisterTokens(config.d_model) if config.registers else None

    def forward(self, tokens: Tensor, groups: Tensor, labels: Tensor | None = None,
                targets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """tokens: LongTensor[B, L]; groups: BoolTensor[B, L] (True = group 1); targets: LongTensor[B, L].

        Returns float32 logits [B, L, V], or with ``targets`` their float32 NLL [B, L] (with
        ``weights`` [B, L] too, the scalar ``sum(weights * nll)``: ``layers.OutputLayer``):
        group-1 rows predicted from group 0 only and group-0 rows from group 1 only.
        With registers, the two register tokens take positions 0 and 1 (the tokens' shift by 2), each
        in its group (``config.register_order``: group 1's first, as the reference); their own rows
        are not returned.
        """
        x = self.embed(tokens)
        if self.registers is not None:
            registers = self.registers(x.shape[0], x.dtype)  # group 0's, group 1's
            flags = torch.tensor([False, True], device=groups.device)
            if self.config.register_order == "reference":
                registers, flags = registers.flip(1), flags.flip(0)
            x = torch.cat([registers, x], dim=1)
            groups = torch.cat([flags.expand(groups.shape[0], 2), groups], dim=1)
        positions = positions_like(x)
        rope = self.rotary(positions)
        c = self.cond(labels)
        memory = self._encode(x, rope, c, AttentionMask.same_group(groups))
        return self._decode(positions, rope, memory, rope, c, AttentionMask.cross_group(groups), targets,
                            skip=0 if self.registers is None else 2, weights=weights)

    def predict(self, clean_tokens: Tensor, clean_positions: Tensor, query_positions: Tensor,
                clean_lengths: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """The sampling path: encode the clean tokens only, decode the queries only.

        clean_tokens, clean_positions: [B, C]; query_positions: [B, Q];
        clean_lengths: optional [B], sequence ``b`` using its first ``clean_lengths[b]``
        clean entries (the rest is padding). Returns float32 logits [B, Q, V].
        The clean tokens are group 0: with registers, group 0's register joins them.
        """
        x = self.embed(clean_tokens)
        if self.registers is not None:
            x = torch.cat([self.registers(x.shape[0], x.dtype)[:, :1], x], dim=1)
            register_position = 1 if self.config.register_order == "reference" else 0
            clean_positions = torch.cat([torch.full_like(clean_positions[:, :1], register_position),
                                         clean_positions + 2], dim=1)
            query_positions = query_positions + 2
            clean_lengths = None if clean_lengths is None else clean_lengths + 1
        mask = AttentionMask.full(clean_lengths)
        k_rope = self.rotary(clean_positions)
        c = self.cond(labels)
        memory = self._encode(x, k_rope, c, mask)
        return self._decode(query_positions, self.rotary(query_positions), memory, k_rope, c, mask)

    def _encode(self, x: Tensor, rope: Rope, c: Tensor, mask: AttentionMask) -> Tensor:
        return run_blocks(self.encoder, x, self.config.activation_checkpointing, c, rope, mask)

    def _decode(self, query_positions: Tensor, q_rope: Rope, memory: Tensor, k_rope: Rope, c: Tensor,
                mask: AttentionMask, targets: Tensor | None = None, skip: int = 0,
                weights: Tensor | None = None) -> Tensor:
        """``skip``: leading rows (the registers') that predict nothing."""
        x = self.group_swap(query_positions, memory, q_rope, k_rope, mask)
        x = run_blocks(self.decoder, x, self.config.activation_checkpointing, c, q_rope, mask, memory=memory,
                       k_rope=k_rope)
        return self.output(x[:, skip:], c, targets, weights)
