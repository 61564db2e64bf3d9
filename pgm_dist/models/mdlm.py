"""MDLM baseline (section 5): one bidirectional stack over the noisy sequence."""
from __future__ import annotations

from torch import Tensor, nn

from pgm_dist.attention.interface import AttentionMask
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.layers import Block, Conditioning, OutputLayer, Rotary, positions_like, run_blocks, token_embedding


class MDLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = token_embedding(config.vocab_size + 1, config.d_model)  # + the MASK id
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.cond = Conditioning(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_enc))
        self.output = OutputLayer(config, config.vocab_size)

    def forward(self, noisy_tokens: Tensor, labels: Tensor | None = None, targets: Tensor | None = None,
                weights: Tensor | None = None) -> Tensor:
        """noisy_tokens: LongTensor[B, L] with MASK = ``config.mask_id``; targets: LongTensor[B, L].

        Returns float32 logits [B, L, V] over the tokenizer's vocabulary, or with
        ``targets`` their float32 NLL [B, L] (with ``weights`` [B, L] too: ``sum(weights * nll)``,
        ``layers.OutputLayer``). MASK (id V) has no column: it is never a
        target and a sampler cannot draw it.
        """
        rope = self.rotary(positions_like(noisy_tokens))
        c = self.cond(labels)
        x = run_blocks(self.blocks, self.embed(noisy_tokens), self.config.activation_checkpointing, c, rope,
                       AttentionMask.full())
        return self.output(x, c, targets, weights)
