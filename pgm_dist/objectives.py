"""Noise schedule, time sampling and training objectives (sections 2, 4 and 5).

Every training objective exposes the same two calls, so the engine (and later the
distillation loop) can drive any of them:

- ``loss(model, tokens, t, generator) -> scalar``: the training loss of a micro-batch;
- ``nelbo(model, tokens, t, generator) -> (sum, count)``: validation NELBO terms,
  to be summed over the split and divided by the summed count.

They never see logits: the networks take ``targets=`` and the per-token ``weights=`` of
the objective (which do not depend on the parameters) and return ``sum(weights * nll)``,
computed in chunks of tokens (``ModelConfig.loss_chunk``) by the fused op of
``models/linear_ce.py``, whose forward already makes the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

T_MIN = 1e-3  # the pre-training objectives' time floor (distillation samples down to 1e-5)


@dataclass(frozen=True)
class LogLinearSchedule:
    """``alpha(t) = 1 - (1 - eps) t``: the probability that a token is still clean at time t."""

    eps: float = 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def group1_weight(self, t: Tensor) -> Tensor:
        """Weight of a token masked at level t: ``(1 - eps) / (1 - alpha(t))`` (= 1/t)."""
        return (1 - self.eps) / (1 - self.alpha(t))

    def group0_weight(self, t: Tensor) -> Tensor:
        """Weight of group 0, masked at the level t' with ``1 - alpha(t') = alpha(t)``.

        Exact, and bounded by 1/eps (the reference code's ``1/(1 - t)`` is infinite at t = 1).
        """
        return (1 - self.eps) / self.alpha(t)

    def reveal_probability(self, t: float, s: float) -> float:
        """Probability that a token masked at time t is clean at the earlier time s < t."""
        alpha_t, alpha_s = 1 - (1 - self.eps) * t, 1 - (1 - self.eps) * s
        return (alpha_s - alpha_t) / (1 - alpha_t)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, rank, micro-step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def shared_uniform(seed: int, step: int) -> float:
    """The one ``U ~ Uniform[0, 1)`` of an optimizer step, equal on every rank without communication."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def global_sample_indices(micro_batch: int, rank: int, world_size: int, micro_step: int) -> Tensor:
    """Indices in the global batch of one rank's micro-batch at one accumulation micro-step."""
    start = (micro_step * world_size + rank) * micro_batch
    return torch.arange(start, start + micro_batch)


def low_discrepancy_times(u: float, indices: Tensor, n: int, t_min: float) -> Tensor:
    """``t_i = t_min + (1 - t_min) * ((u + i / n) mod 1)`` for the global indices ``i`` (float32)."""
    stratified = torch.remainder(u + indices.double() / n, 1.0)
    return (t_min + (1 - t_min) * stratified).float()


def partition_groups(t: Tensor, seq_len: int, schedule: LogLinearSchedule,
                     generator: torch.Generator | None = None) -> Tensor:
    """Each position joins group 1 with probability ``1 - alpha(t)``: BoolTensor[B, L]."""
    u = torch.rand(t.shape[0], seq_len, generator=generator, device=t.device)
    return u < (1 - schedule.alpha(t))[:, None]


def pgm_token_weights(groups: Tensor, t: Tensor, schedule: LogLinearSchedule) -> Tensor:
    """Per-token weights ``w_{g(i)}`` of the NLL terms: [B, L]."""
    w1 = schedule.group1_weight(t)[:, None]
    w0 = schedule.group0_weight(t)[:, None]
    return torch.where(groups, w1, w0)


@dataclass(frozen=True)
class PGMObjective:
    """Both complementary masked-modelling NELBOs (at t and t') in one pass.

    ``t_min``: the floor of the noise levels the engine and the evaluation draw.
    """

    schedule: LogLinearSchedule = LogLinearSchedule()
    t_min: float = T_MIN

    def loss(self, model, tokens: Tensor, t: Tensor, generator=None) -> Tensor:
        """``sum_i w_{g(i)} nll_i / (2 B L)``."""
        groups = partition_groups(t, tokens.shape[1], self.schedule, generator)
        weights = pgm_token_weights(groups, t, self.schedule) / (2 * tokens.numel())
        return model(tokens, groups, targets=tokens, weights=weights)

    def nelbo(self, model, tokens: Tensor, t: Tensor, generator=None) -> tuple[Tensor, int]:
        """Group-1 terms only, comparable with MDLM: ``(sum_i [g(i)=1] w1 nll_i, B L)``."""
        groups = partition_groups(t, tokens.shape[1], self.schedule, generator)
        weights = groups * self.schedule.group1_weight(t)[:, None]
        return model(tokens, groups, targets=tokens, weights=weights), tokens.numel()


def mask_tokens(tokens: Tensor, t: Tensor, mask_id: int, schedule: LogLinearSchedule,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MDLM forward process: mask each token with probability ``1 - alpha(t)``.

    Returns (noisy tokens [B, L], masked [B, L] bool).
    """
    masked = partition_groups(t, tokens.shape[1], schedule, generator)
    return tokens.masked_fill(masked, mask_id), masked


@dataclass(frozen=True)
class MDLMObjective:
    """MDLM continuous-time NELBO: ``sum_i [masked] w1 nll_i / (B L)``."""

    mask_id: int
    schedule: LogLinearSchedule = LogLinearSchedule()
    t_min: float = T_MIN

    def nelbo(self, model, tokens: Tensor, t: Tensor, generator=None) -> tuple[Tensor, int]:
        noisy, masked = mask_tokens(tokens, t, self.mask_id, self.schedule, generator)
        weights = masked * self.schedule.group1_weight(t)[:, None]
        return model(noisy, targets=tokens, weights=weights), tokens.numel()

    def loss(self, model, tokens: Tensor, t: Tensor, generator=None) -> Tensor:
        total, count = self.nelbo(model, tokens, t, generator)
        return total / count


def unpack(batch, device: torch.device) -> tuple[Tensor, dict]:
    """A loader batch on ``device`` -> (tokens, the objective's extra keyword arguments): text
    loaders yield token tensors, image loaders ``(tokens, labels)``."""
    if isinstance(batch, (tuple, list)):
        tokens, labels = batch
        return tokens.to(device, non_blocking=True), {"labels": labels.to(device, non_blocking=True)}
    return batch.to(device, non_blocking=True), {}
