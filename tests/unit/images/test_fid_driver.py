"""The FID of an image model against a folder of real pictures (``evaluate --fid``): the reference's
preparation (float x 255, PIL bicubic to 299, truncated to uint8), one sample per real label, the
Inception Score from the feature file's logits. A random tiny VQ, a released-layout image PGM and a
scripted feature network stand in for the downloads."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pgm_dist.checkpoints.load import image_decoder_path, load_model
from pgm_dist.convert import main as convert_main
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.evaluate import main as evaluate_main
from pgm_dist.images.data import list_image_folder, load_picture
from pgm_dist.images.pictures import pixel_decoder
from pgm_dist.images.quality import fid, fid_inputs, inception_score, load_feature_extractor, model_fid
from pgm_dist.images.sampling import sample_image_pgm
from pgm_dist.images.vq import VQConfig, VQModel
from tests.helpers.reference import random_reference_state, reference_image_layout, save_image_release

CODEBOOK, CLASSES = 30, 3


class Features(torch.nn.Module):
    """Pooled colour statistics (12 features) and 5 logits: a deterministic stand-in for Inception."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return pooled, self.head(pooled)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(export folder, real picture folder, features file)."""
    tmp = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    layout = reference_image_layout(CODEBOOK, 64, 2, CLASSES)
    release = save_image_release(tmp / "images_pgm.ckpt", random_reference_state(layout, seed=2))
    vq = VQConfig(codebook_size=CODEBOOK, codebook_embed_dim=4, ch=32, encoder_ch_mult=(1, 2),
                  decoder_ch_mult=(1, 2), z_channels=8, num_res_blocks=1)
    torch.save({"model": VQModel(vq).state_dict()}, tmp / "vq.pt")
    export = tmp / "export"
    assert convert_main(["reference", str(release), "--out", str(export), "--vq", str(tmp / "vq.pt")]) == 0
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        folder = tmp / "real" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    features = tmp / "features.pt"
    torch.jit.script(Features().eval()).save(str(features))
    return export, tmp / "real", features


def test_fid_inputs_are_the_references_float_bicubic_then_truncated_uint8():
    pictures = np.full((2, 6, 8, 3), 0.999, np.float32)  # 254.745: truncated to 254, never rounded to 255
    pictures[1] = 1.5  # clipped to 255
    out = fid_inputs(pictures)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    assert torch.all(out[0] == 254 / 255) and torch.all(out[1] == 1.0)
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32)[None, :, None], (6, 1, 3))[None]
    row = fid_inputs(ramp)[0, 0, 150].numpy() * 255
    assert np.all(np.diff(row) >= -1) and row[0] < 5 and row[-1] > 250  # a resized ramp, left to right


def test_inception_score_of_known_distributions():
    assert inception_score(np.zeros((40, 5)), splits=1)[0] == pytest.approx(1.0)  # every p(y|x) the marginal
    confident = np.eye(4)[np.arange(40) % 4] * 50.0  # sure of one class each, the classes equally often
    assert inception_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-6)


def test_model_fid_samples_the_real_labels_and_scores_both_sets_alike(setup):
    export, real_dir, features = setup
    loaded = load_model(export)
    decode = pixel_decoder(image_decoder_path(loaded))
    real = list_image_folder(real_dir)
    extractor = load_feature_extractor(features)
    result = model_fid(loaded.model, decode, real, extractor, num=7, steps=2, cfg=1.0, batch=4, seed=3,
                       progress=False)
    order = np.random.default_rng(3).permutation(len(real.files))[:7]
    assert result["num"] == 7 and sorted(result["labels"]) == sorted(real.labels[i] for i in order)
    # the same pipeline from its public pieces: the sampler's draws (same seed, same batches), the real pictures
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor(result["labels"])
    generated, reals = [], []
    for start in range(0, 7, 4):
        codes = sample_image_pgm(loaded.model, labels[start:start + 4], 2, cfg=1.0, generator=generator)[:, 1:]
        pixels = decode(codes.reshape(-1, *loaded.config.image_grid))  # the released 32 x 32
        generated.append(extractor(fid_inputs(pixels))[0].double().numpy())
        picture = torch.stack([load_picture(real.files[i], pixels.shape[1]) for i in order[start:start + 4]])
        reals.append(extractor(fid_inputs(((picture + 1) / 2).permute(0, 2, 3, 1).numpy()))[0].double().numpy())
    assert result["fid"] == pytest.approx(fid(np.concatenate(reals), np.concatenate(generated)), rel=1e-9)
    assert result["fid"] > 0 and 1.0 <= result["inception_score"] <= 5.0


def test_evaluate_fid_command(setup, tmp_path, capsys):
    export, real_dir, features = setup
    assert evaluate_main(["--model", str(export), "--fid", str(real_dir), "--features", str(features), "--num", "5",
                          "--steps", "2", "--fid-batch", "3", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "real pictures" in out and "(5, their labels)" in out and "FID " in out and "Inception Score" in out
    assert evaluate_main(["--model", str(export), "--fid", str(real_dir), "--device", "cpu"]) == 2
    assert "--fid needs --features FILE" in capsys.readouterr().err
    subset = tmp_path / "two-classes"
    for name in ("class0", "class1"):
        shutil.copytree(real_dir / name, subset / name)
    assert evaluate_main(["--model", str(export), "--fid", str(subset), "--features", str(features), "--device",
                          "cpu"]) == 2  # labels by sorted folder: they would name the wrong classes
    assert "have 2 class sub-folders, the model 3 classes" in capsys.readouterr().err
    release = export.parent / "images_pgm.ckpt"  # the file itself: its decoder is not beside it
    assert evaluate_main(["--model", str(release), "--fid", str(real_dir), "--features", str(features), "--device",
                          "cpu"]) == 2
    assert "convert it with its VQ first" in capsys.readouterr().err


def test_a_converted_image_model_evaluates_on_a_folder_of_its_codes(setup, tmp_path, capsys):
    """No checksum travels with a released model: a folder with its grid, codebook, classes and VQ is its
    own (the pictures at 64 px through the f = 2 VQ: 32 x 32 codes, as the released models read)."""
    export, real_dir, _ = setup
    data = tmp_path / "codes"
    assert data_cli(["build-images", "--vq", str(export.parent / "vq.pt"), "--input", str(real_dir), "--out", str(data),
                     "--image-size", "64", "--no-progress"]) == 0
    assert evaluate_main(["--model", str(export), "--data", str(data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    nelbo = float(out.split("NELBO ")[1].split()[0])
    assert 0 < nelbo < 2 * np.log(CODEBOOK + 1) and "nats/code" in out
    other = tmp_path / "other"
    assert data_cli(["build-images", "--vq", str(export.parent / "vq.pt"), "--input", str(real_dir), "--out",
                     str(other), "--image-size", "32", "--no-progress"]) == 0  # a 16 x 16 grid
    assert evaluate_main(["--model", str(export), "--data", str(other), "--device", "cpu"]) == 2
    assert "does not hold the image codes" in capsys.readouterr().err
