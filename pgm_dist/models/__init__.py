"""Networks: :class:`PGM` and the :class:`MDLM` baseline, built from one config."""
from torch import nn

from pgm_dist.models.config import ModelConfig
from pgm_dist.models.mdlm import MDLM
from pgm_dist.models.pgm import PGM

_ARCHITECTURES = {"pgm": PGM, "mdlm": MDLM}


def build_model(config: ModelConfig) -> nn.Module:
    return _ARCHITECTURES[config.arch](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MDLM", "PGM", "build_model", "count_parameters"]
