"""What a run trains: the model and its objective (the one text/image switch), as a :class:`Task`
that distillation overrides, and the :class:`Setup` a task builds from (filled in by
:func:`pgm_dist.training.setup.prepare`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgm_dist.common.distributed import DistEnv
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder
from pgm_dist.data.tokenizer import Tokenizer
from pgm_dist.images.objective import ImageObjective
from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig
from pgm_dist.objectives import MDLMObjective, PGMObjective
from pgm_dist.training.config import TrainConfig


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

    def build(self, setup: Setup) -> tuple[torch.nn.Module, object]:
        """The model to train, weights initialised, and its objective (before DeepSpeed)."""
        return build_model(setup.model_config), objective_for(setup.model_config)

    def attach(self, loop, setup: Setup) -> None:
        """Add hooks to ``loop.p`` (``LoopParts``) once the engine exists, before any restore."""


@dataclass
class Setup:
    """Everything decided before any distributed work."""
    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    folder: DataFolder
    tokenizer: Tokenizer | None  # None for image data (codes are decoded to pixels, not text)
    model_config: ModelConfig
    ds_config: dict
    train_loader: TrainLoader
    resume_from: Path | None
    universal: bool
    out: Path
    launch: dict = field(default_factory=dict)  # who started this process (SLURM job id, nodes), logged at start
    task: Task = field(default_factory=Task)
