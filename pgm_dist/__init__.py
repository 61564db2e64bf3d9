"""pgm_dist: distributed training, distillation and sampling of Partition Generative Models."""
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import PRESETS, ModelConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "build_model", "count_parameters", "load_model", "__version__"]


def __getattr__(name: str):
    """``pgm_dist.load_model``: imported on first use (it reads checkpoints, tokenizers and data
    folders, which ``import pgm_dist`` alone does not need)."""
    if name == "load_model":
        from pgm_dist.checkpoints.load import load_model

        return load_model
    raise AttributeError(f"module 'pgm_dist' has no attribute {name!r}")
