"""MDLM baseline (section 5): one bidirectional stack over the noisy sequence."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pgm_dist.attention import AttentionMask
from pgm_dist.config import ModelConfig
from pgm_dist.models.layers import Block, Conditioning, OutputLayer, Rotary, positions_like, token_embedding


class MDLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = token_embedding(config.vocab_size + 1, config.d_model)  # + the MASK id
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.cond = Conditioning(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_enc))
        self.output = OutputLayer(config, config.vocab_size)

    def forward(self, noisy_tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """noisy_tokens: LongTensor[B, L] with MASK = ``config.mask_id``.

        Returns float32 logits [B, L, V + 1]; the last column (the MASK id) is -inf.
        """
        rope = self.rotary(positions_like(noisy_tokens))
        c = self.cond(labels)
        mask = AttentionMask.full()
        x = self.embed(noisy_tokens)
        for block in self.blocks:
            x = block(x, c, rope, mask)
        logits = self.output(x, c)
        never_mask = torch.full_like(logits[..., :1], float("-inf"))
        return torch.cat([logits, never_mask], dim=-1)
