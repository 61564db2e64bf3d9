"""Partition Generative Model (section 3 of docs/pgm-algorithm.md).

Encoder (same-group self-attention) -> GroupSwap (content-free queries attending the
other group) -> decoder (cross-attention only, to the final encoder output) -> logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgm_dist.attention import AttentionMask
from pgm_dist.config import ModelConfig
from pgm_dist.models.layers import (
    Block, Conditioning, MultiHeadAttention, OutputLayer, Rope, Rotary, positions_like, run_blocks, sinusoid,
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
        self.attn = MultiHeadAttention(config)

    def forward(self, query_positions: Tensor, memory: Tensor, q_rope: Rope, k_rope: Rope,
                mask: AttentionMask) -> Tensor:
        """query_positions: [B or 1, Q]; memory: [B, C, d] -> [B, Q, d]."""
        queries = self.norm(self.query_seed + sinusoid(query_positions, self.d_model).to(memory.dtype))
        queries = queries.expand(memory.shape[0], -1, -1)
        return self.attn(queries, memory, q_rope, k_rope, mask)


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

    def forward(self, tokens: Tensor, groups: Tensor, labels: Tensor | None = None,
                targets: Tensor | None = None) -> Tensor:
        """tokens: LongTensor[B, L]; groups: BoolTensor[B, L] (True = group 1); targets: LongTensor[B, L].

        Returns float32 logits [B, L, V], or with ``targets`` their float32 NLL [B, L]:
        group-1 rows predicted from group 0 only and group-0 rows from group 1 only.
        """
        positions = positions_like(tokens)
        rope = self.rotary(positions)
        c = self.cond(labels)
        memory = self._encode(tokens, rope, c, AttentionMask.same_group(groups))
        return self._decode(positions, rope, memory, rope, c, AttentionMask.cross_group(groups), targets)

    def predict(self, clean_tokens: Tensor, clean_positions: Tensor, query_positions: Tensor,
                clean_lengths: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """The sampling path: encode the clean tokens only, decode the queries only.

        clean_tokens, clean_positions: [B, C]; query_positions: [B, Q];
        clean_lengths: optional [B], sequence ``b`` using its first ``clean_lengths[b]``
        clean entries (the rest is padding). Returns float32 logits [B, Q, V].
        """
        mask = AttentionMask.full(clean_lengths)
        k_rope = self.rotary(clean_positions)
        c = self.cond(labels)
        memory = self._encode(clean_tokens, k_rope, c, mask)
        return self._decode(query_positions, self.rotary(query_positions), memory, k_rope, c, mask)

    def _encode(self, tokens: Tensor, rope: Rope, c: Tensor, mask: AttentionMask) -> Tensor:
        return run_blocks(self.encoder, self.embed(tokens), self.config.activation_checkpointing, c, rope, mask)

    def _decode(self, query_positions: Tensor, q_rope: Rope, memory: Tensor, k_rope: Rope, c: Tensor,
                mask: AttentionMask, targets: Tensor | None = None) -> Tensor:
        x = self.group_swap(query_positions, memory, q_rope, k_rope, mask)
        x = run_blocks(self.decoder, x, self.config.activation_checkpointing, c, q_rope, mask, memory=memory,
                       k_rope=k_rope)
        return self.output(x, c, targets)
