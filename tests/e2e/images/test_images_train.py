"""The digits demo end to end: build-images --digits, pgm-img-tiny through the real ``deepspeed``
launcher (2 ranks, ZeRO-2), sample pictures in TensorBoard and as PNG files, the sample CLI on an
export, and the digits classifier on class-conditional samples: guidance works."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgm_dist.checkpoints.load import load_model
from pgm_dist.images.data import build_digits
from pgm_dist.images.quality import digits_classifier, digits_quality
from tests.helpers.training import REPO, run_train, scalars

STEPS = 240


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data = root / "digits"
    build_digits(data, log=lambda *_: None)
    out = root / "run"
    done = run_train(["--model", "pgm-img-tiny", "--data", str(data), "--out", str(out), "--max-steps", str(STEPS),
                      "--global-batch", "64", "--micro-batch", "32", "--lr", "2e-3", "--warmup-steps", "20",
                      "--ema-decay", "0.99", "--eval-every", "120", "--eval-batches", "3", "--log-every", "20",
                      "--ckpt-every", str(STEPS), "--sample-every", "120", "--sample-steps", "8",
                      "--num-samples", "3"], ranks=2)
    return data, out, done


def test_image_run_logs_pictures_and_learns(digits_run):
    _, out, done = digits_run
    assert "sample pictures" in done.stdout
    pictures = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in pictures] == ["step_00000120.png", "step_00000240.png"]
    width, height = Image.open(pictures[-1]).size
    assert (width, height) == (3 * 64 + 2 * 2, 10 * 64 + 9 * 2)  # 10 classes x 3, digits drawn x8
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/grid")] == [120, 240]
    nelbo = scalars(out / "tb")["val/nelbo"]
    # Cross-entropy per code: log(17) = 2.83 at the start; the grey levels are far from uniform.
    assert nelbo[240] < nelbo[120] < 2.0


def test_guided_samples_are_the_requested_digits(digits_run, tmp_path):
    _, out, _ = digits_run
    loaded = load_model(out)
    assert loaded.tokenizer is None and loaded.config.image_grid == [8, 8] and loaded.config.num_classes == 10
    rows = digits_quality(loaded.model, digits_classifier(tmp_path), steps=[8], cfgs=[0.0, 3.0], per_class=20)
    unguided, guided = rows[0]["accuracy"], rows[1]["accuracy"]
    # Chance is 0.1; measured 0.80 without guidance and 0.975 with w = 3 (diversity 2.61 -> 2.20).
    assert guided > 0.7 and guided > unguided, rows  # guidance sharpens the class ...
    assert 0.5 < rows[1]["diversity"] < rows[0]["diversity"], rows  # ... at some cost in diversity, not all


def test_sample_cli_writes_a_grid_from_an_export(digits_run, tmp_path):
    _, out, _ = digits_run
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "pgm_dist.export", "--ckpt", str(out), "--out", str(export)],
                   cwd=REPO, check=True, capture_output=True)
    assert not (export / "tokenizer.model").exists()
    grid = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "pgm_dist.sample", "--model", str(export), "--classes", "3", "7",
                           "--num", "5", "--steps", "8", "--cfg", "2", "--out", str(grid)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (2 * 64 + 2, 5 * 64 + 4 * 2, 3)
    cell = picture[:64, :64, 0]  # the first picture: 8x8 grey levels, each drawn as an 8x8 block
    levels = cell[::8, ::8]
    assert np.array_equal(cell, np.kron(levels, np.ones((8, 8), dtype=np.uint8)))
    assert set(np.unique(levels)) <= {round(255 * v / 16) for v in range(17)}
    bad = subprocess.run([sys.executable, "-m", "pgm_dist.sample", "--model", str(export), "--classes", "12"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "0..9" in bad.stderr


def test_image_data_needs_an_image_preset_and_the_other_way_round(digits_run, data, tmp_path):
    digits, _, _ = digits_run
    for model, folder, message in (("pgm-tiny", digits, "image preset"), ("pgm-img-tiny", data, "image data")):
        done = run_train(["--model", model, "--data", str(folder), "--out", str(tmp_path / model), "--max-steps", "1"],
                         launcher=False, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_evaluate_reports_an_image_models_validation_cross_entropy(digits_run, data, capsys):
    """``python -m pgm_dist.evaluate`` on the digits model (it crashed on the missing tokenizer): the
    cross-entropy per code over the validation split, against the dense logits of the same draws."""
    import torch
    import torch.nn.functional as F

    from pgm_dist import evaluate
    from pgm_dist.data.loader import ValidationLoader
    from pgm_dist.data.shards import DataFolder
    from pgm_dist.images.objective import ImageObjective
    from pgm_dist.objectives import derived_seed, low_discrepancy_times

    digits, out, _ = digits_run
    assert evaluate.main(["--model", str(out), "--batches", "2", "--micro-batch", "16", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    reported = float(printed.split("NELBO ")[1].split()[0])
    assert "nats/code" in printed and "validation codes" in printed
    loaded = load_model(out)
    objective = ImageObjective(num_classes=loaded.config.num_classes)
    folder = DataFolder.open(digits)
    total = count = 0.0
    for index, (tokens, labels) in enumerate(ValidationLoader(folder.val_sources, seq_len=folder.meta.seq_len,
                                                              micro_batch=16, max_batches=2, labels=True)):
        generator = torch.Generator().manual_seed(derived_seed(3, 0, index))
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        r = low_discrepancy_times(u, torch.arange(tokens.shape[0]), tokens.shape[0], objective.t_min)
        groups = objective.groups(r, tokens.shape[1], generator)
        with torch.no_grad():
            logits = loaded.model(tokens, groups, labels=labels)  # the dense path: whole logits
        total += F.cross_entropy(logits[:, 1:].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
        count += tokens[:, 1:].numel()
    assert reported == pytest.approx(total / count, abs=1e-5)
    # a text folder, or an evaluator of texts, is refused with a message
    assert evaluate.main(["--model", str(out), "--data", str(data), "--batches", "1"]) == 2
    assert "does not hold the image codes" in capsys.readouterr().err
    assert evaluate.main(["--model", str(out), "--batches", "1", "--eval-model", "gpt2"]) == 2
    assert "--eval-model scores texts" in capsys.readouterr().err
