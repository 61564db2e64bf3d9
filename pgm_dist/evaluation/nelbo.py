"""Validation NELBO: the sums every rank accumulates, and the perplexity they give."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from pgm_dist.objectives import derived_seed, low_discrepancy_times, unpack


def perplexity(nats: float) -> float:
    """exp(nats per token), capped so that a diverged model reports a huge number, not an overflow."""
    return math.exp(min(nats, 700.0))


def nelbo_sums(model, objective, batches: Iterable[torch.Tensor], device: torch.device, seed: int,
               rank: int = 0) -> torch.Tensor:
    """``[sum of NELBO terms, token count]`` (float64) over ``batches``; noise levels and
    partitions are seeded per (seed, rank, batch index)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # An objective that trains at another floor than its NELBO's (distillation) names the latter.
    t_min = getattr(objective, "eval_t_min", objective.t_min)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            tokens, extra = unpack(batch, device)
            generator = torch.Generator(device).manual_seed(derived_seed(seed, rank, index))
            u = torch.rand((), generator=generator, device=device, dtype=torch.float64).item()
            t = low_discrepancy_times(u, torch.arange(tokens.shape[0]), tokens.shape[0], t_min).to(device)
            nelbo_sum, count = objective.nelbo(model, tokens, t, generator, **extra)
            total += torch.stack([nelbo_sum.double(), torch.tensor(float(count), device=device, dtype=torch.float64)])
    model.train(was_training)
    return total


def nelbo_and_perplexity(total: torch.Tensor) -> tuple[float, float]:
    if total[1] == 0:
        return float("nan"), float("nan")
    nelbo = (total[0] / total[1]).item()
    return nelbo, perplexity(nelbo)
