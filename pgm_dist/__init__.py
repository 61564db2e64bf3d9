"""pgm_dist: distributed training, distillation and sampling of Partition Generative Models."""
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import PRESETS, ModelConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "build_model", "count_parameters", "__version__"]
