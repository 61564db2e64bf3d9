"""Shared fixtures. Tests under tests/e2e/ get the ``e2e`` marker (``pytest -m "not e2e"`` is the
inner loop); helpers live in tests/helpers/, scripts that ``deepspeed`` runs in tests/scripts/."""
import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (exact semantics, slow).
# Read when a kernel is defined: set before pgm_dist's lazy import of the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers.models import randomized_model  # noqa: E402

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The built-in corpus (the standard library), with short blocks so CPU steps are fast."""
    from pgm_dist.data.builder import BuildSettings, build

    out = tmp_path_factory.mktemp("data") / "stdlib"
    build(out, None, BuildSettings(vocab_size=1024, seq_len=64, samples_per_shard=2048, val_fraction=0.02),
          progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def small_data():
    """A small data folder (vocabulary 400, blocks of 32 tokens, 160 train blocks): the pre-move
    fixture's, read only; unit tests that need real shards but not the built-in corpus use it."""
    from tests.helpers.legacy import LEGACY

    return LEGACY / "data"


@pytest.fixture
def pgm_model():
    return randomized_model("pgm-tiny")


@pytest.fixture
def mdlm_model():
    return randomized_model("mdlm-tiny")
