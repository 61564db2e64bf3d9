"""The image objective (section 9): class-conditional PGM on VQ token grids.

Group-1 probability from MaskGIT's arccos schedule, ``p = arccos(r) / (pi / 2)`` with ``r`` the
engine's low-discrepancy level; BOS (position 0) always in group 0; the unweighted mean
cross-entropy over every code position of both groups; 10% of the labels replaced by the
null label (``num_classes``) so the same network also learns the unconditional model that
classifier-free guidance needs. Same interface as the text objectives, so the one engine
drives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pgm_dist.objectives import T_MIN


def arccos_group1_probability(r: Tensor) -> Tensor:
    """``arccos(r) / (pi / 2)``: 1 at r = 0 (every code in group 1), 0 at r = 1."""
    return torch.arccos(r.clamp(0.0, 1.0)) / (math.pi / 2)


@dataclass(frozen=True)
class ImageObjective:
    num_classes: int
    label_dropout: float = 0.1
    t_min: float = T_MIN

    def groups(self, r: Tensor, seq_len: int, generator: torch.Generator | None = None) -> Tensor:
        """BoolTensor[B, L]: group 1 with probability ``arccos(r) / (pi/2)``; BOS never."""
        u = torch.rand(r.shape[0], seq_len, generator=generator, device=r.device)
        groups = u < arccos_group1_probability(r)[:, None]
        groups[:, 0] = False
        return groups

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.label_dropout
        return labels.masked_fill(dropped, self.num_classes)

    def _nll_sum(self, model, tokens: Tensor, r: Tensor, generator, labels: Tensor, drop: bool,
                 mean: bool) -> tuple[Tensor, int]:
        """(the codes' summed NLL, or its mean with ``mean``; BOS weighs 0), the number of codes."""
        codes = tokens.shape[0] * (tokens.shape[1] - 1)
        groups = self.groups(r, tokens.shape[1], generator)  # drawn first: the partition ignores the dropout
        if drop:
            labels = self.drop_labels(labels, generator)
        weights = torch.full(tokens.shape, 1 / codes if mean else 1.0, device=tokens.device)
        weights[:, 0] = 0  # the codes, not BOS
        return model(tokens, groups, labels=labels, targets=tokens, weights=weights), codes

    def loss(self, model, tokens: Tensor, t: Tensor, generator=None, labels: Tensor | None = None) -> Tensor:
        """Mean cross-entropy per code over both groups (labels dropped to null 10% of the time)."""
        if labels is None:
            raise ValueError("the image objective needs class labels (an image data folder)")
        return self._nll_sum(model, tokens, t, generator, labels, drop=True, mean=True)[0]

    def nelbo(self, model, tokens: Tensor, t: Tensor, generator=None,
              labels: Tensor | None = None) -> tuple[Tensor, int]:
        """Validation: (summed cross-entropy of every code, count), with the true labels. Logged
        as ``val/nelbo``: for images it is the training loss (nats per code), not a bound."""
        if labels is None:
            raise ValueError("the image objective needs class labels (an image data folder)")
        return self._nll_sum(model, tokens, t, generator, labels, drop=False, mean=False)
