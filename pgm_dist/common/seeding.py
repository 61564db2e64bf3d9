"""Seeds derived from the run's seed, one rule each."""
from __future__ import annotations


def sample_seed(seed: int, step: int) -> int:
    """The generator seed of the samples drawn at ``step`` (texts, pictures, distillation's round
    evaluation): fixed per (run seed, step), so a resumed run draws what it would have drawn."""
    return seed * 7919 + step
