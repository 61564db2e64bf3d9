import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (exact semantics, slow).
# Read when a kernel is defined: set before pgm_dist's lazy import of the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig

  # noqa: E402


def randomized_model(preset: str, vocab_size: int = 61, seq_len: int = 48, seed: int = 0, **overrides):
    """A tiny model whose zero-initialised layers (adaLN gates, output) are made non-zero,
    so that every path of the network actually carries information."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.preset(preset, vocab_size=vocab_size, seq_len=seq_len, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The built-in corpus (the standard library), with short blocks so CPU steps are fast."""
    from pgm_dist.data.builder import BuildSettings, build

    out = tmp_path_factory.mktemp("data") / "stdlib"
    build(out, None, BuildSettings(vocab_size=1024, seq_len=64, samples_per_shard=2048, val_fraction=0.02),
          progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def pgm_model():
    return randomized_model("pgm-tiny")


@pytest.fixture
def mdlm_model():
    return randomized_model("mdlm-tiny")
