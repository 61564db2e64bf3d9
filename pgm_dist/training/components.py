"""What a run trains: the model and its objective (the one text/image switch), as a :class:`Task`
that distillation overrides."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pgm_dist.images.objective import ImageObjective
from pgm_dist.models import build_model
from pgm_dist.objectives import MDLMObjective, PGMObjective

if TYPE_CHECKING:
    from pgm_dist.training.setup import Setup


def objective_for(config):
    """The pre-training objective of a model config: PGM, MDLM, or (an image grid) the image one."""
    if config.image_grid is not None:
        if config.arch != "pgm" or not config.num_classes:
            raise ValueError("image training needs a class-conditional PGM (a pgm-img-* preset)")
        return ImageObjective(num_classes=config.num_classes)
    return PGMObjective() if config.arch == "pgm" else MDLMObjective(mask_id=config.mask_id)


class Task:
    """What :func:`run` trains: pre-training. Distillation (:class:`pgm_dist.distillation.task.DistillTask`) overrides
    both methods and ends in the same :func:`run`."""

    def build(self, setup: "Setup") -> tuple[torch.nn.Module, object]:
        """The model to train, weights initialised, and its objective (before DeepSpeed)."""
        return build_model(setup.model_config), objective_for(setup.model_config)

    def attach(self, loop, setup: "Setup") -> None:
        """Add hooks to ``loop.p`` (``LoopParts``) once the engine exists, before any restore."""

