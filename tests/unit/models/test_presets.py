"""The README's preset and memory tables against the code, and the memory numbers against the
ZeRO paper's accounting written out here (independent of DeepSpeed's estimator functions)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from pgm_dist.memory import TEXT_PRESETS, ParamCount, model_state_bytes, preset_parameters, table
from pgm_dist.models import build_model
from pgm_dist.models.config import IMAGE_PRESETS, ModelConfig
from tests.helpers.training import REPO

README = (REPO / "README.md").read_text()


def readme_preset_rows(kind: str) -> dict[str, float]:
    """{preset: parameters in millions} from the Models section's text (``PGM|MDLM``) or image
    (``image PGM``) table."""
    rows = re.findall(rf"^\| `([a-z0-9-]+)` \| {kind} \|.*\| ([\d,.]+)M[^|]*\|$", README, re.M)
    return {name: float(millions.replace(",", "")) for name, millions in rows}


# Each image preset's count at the data it was made for: (codebook, grid side, classes).
IMAGE_DATA = {"pgm-img-tiny": (17, 8, 10), "pgm-img-b": (16384, 32, 1000), "pgm-img-b-14-10": (16384, 32, 1000)}


def test_readme_lists_every_preset_with_its_meta_device_parameter_count():
    text, image = readme_preset_rows("(?:PGM|MDLM)"), readme_preset_rows("image PGM")
    assert set(text) == set(TEXT_PRESETS) and set(image) == set(IMAGE_PRESETS) == set(IMAGE_DATA)
    for name, millions in text.items():
        params = preset_parameters(ModelConfig.preset(name, vocab_size=50258, seq_len=1024))
        assert round(params.total / 1e6, 1) == millions, name
    for name, millions in image.items():
        codebook, side, classes = IMAGE_DATA[name]
        config = ModelConfig.preset(name, vocab_size=codebook + 1, seq_len=1 + side * side, num_classes=classes,
                                    image_grid=[side, side])
        assert round(preset_parameters(config).total / 1e6, 1) == millions, name


@pytest.mark.parametrize("name,low,high", [("pgm-medium", 400e6, 500e6), ("pgm-1b", 0.95e9, 1.2e9)])
def test_large_presets_have_their_size_and_an_mdlm_twin_of_equal_width_and_depth(name, low, high):
    pgm = ModelConfig.preset(name, vocab_size=50258, seq_len=1024)
    mdlm = ModelConfig.preset(name.replace("pgm", "mdlm"), vocab_size=50258, seq_len=1024)
    assert low <= preset_parameters(pgm).total <= high
    assert (mdlm.d_model, mdlm.n_heads, mdlm.n_enc) == (pgm.d_model, pgm.n_heads, pgm.n_enc + pgm.n_dec)
    assert pgm.head_dim == 64


def test_meta_device_counts_equal_a_real_model_and_the_largest_layer_is_the_vocabulary_projection():
    config = ModelConfig.preset("pgm-tiny", vocab_size=1000, seq_len=64)
    real = build_model(config)
    params = preset_parameters(config)
    assert params.total == sum(p.numel() for p in real.parameters())
    d = config.d_model
    assert params.largest_layer == 1000 * d + 1000  # the output projection, V x d + V bias
    big = preset_parameters(ModelConfig.preset("pgm-1b", vocab_size=50258, seq_len=1024))
    assert big.largest_layer == 50258 * 1536 + 50258


def test_memory_per_gpu_follows_the_zero_papers_accounting():
    """Bytes per parameter: 2 bf16 weights, 2 bf16 gradients, 16 fp32 gradients + weights + moments
    (DeepSpeed's accounting). ZeRO-1 partitions the 16, ZeRO-2 also the bf16 gradients, ZeRO-3 also
    the weights, keeping one whole layer gathered (4 bytes per parameter of the largest layer)."""
    p = ParamCount(total=1_000_000_000, largest_layer=80_000_000)
    for n in (8, 16, 64):
        assert model_state_bytes(p, 1, n) == 4 * p.total + 16 * p.total // n
        assert model_state_bytes(p, 2, n) == 2 * p.total + 18 * p.total // n
        assert model_state_bytes(p, 3, n) == 4 * p.largest_layer + 18 * p.total // n
        assert model_state_bytes(p, 1, n) > model_state_bytes(p, 2, n) > model_state_bytes(p, 3, n)
    with pytest.raises(ValueError, match="stage"):
        model_state_bytes(p, 0, 8)


def test_readme_memory_table_is_the_one_the_code_prints():
    written = README.split("<!-- memory-table: python -m pgm_dist.memory -->\n", 1)[1].split("\n\n", 1)[0]
    assert written.strip() == table(TEXT_PRESETS)
    one_b = next(line for line in written.splitlines() if line.startswith("| pgm-1b |"))
    gib = [float(x) for x in one_b.strip("|").split("|")[2:]]
    p = preset_parameters(ModelConfig.preset("pgm-1b", vocab_size=50258, seq_len=1024))
    assert gib[0] == pytest.approx((4 * p.total + 16 * p.total / 8) / 2**30, abs=0.006)  # ZeRO-1 x8


def test_memory_cli_prints_the_table_and_refuses_unknown_presets():
    done = subprocess.run([sys.executable, "-m", "pgm_dist.memory", "--models", "pgm-tiny", "--gpus", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "| pgm-tiny | 14.2M |" in done.stdout and "ZeRO-3 x2" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "pgm_dist.memory", "--models", "pgm-huge"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "pgm-huge" in bad.stderr and "pgm-1b" in bad.stderr


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = build_model(ModelConfig.preset("pgm-1b", vocab_size=50258, seq_len=1024))
    assert all(p.is_meta for p in model.parameters())
