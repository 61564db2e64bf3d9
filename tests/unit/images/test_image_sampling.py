"""Image sampling (Halton order, arccos schedule, CFG), pictures and evaluation math (stage 8)."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pgm_dist.images.data import digits_split
from pgm_dist.images.pictures import digits_pixels, grid_array, save_grid
from pgm_dist.images.quality import (
    class_accuracy,
    digits_classifier,
    diversity,
    extract_features,
    feature_statistics,
    fid,
    fit_digits_classifier,
    frechet_distance,
    load_feature_extractor,
)
from pgm_dist.images.sampling import arccos_counts, halton_order, sample_image_mdlm, sample_image_pgm
from pgm_dist.sampling import sample_categorical
from tests.helpers.models import randomized_model

CODEBOOK, CLASSES = 17, 10  # the digits set: 17 grey levels + BOS, 8x8 grid, 10 classes
BOS = CODEBOOK


@pytest.fixture(scope="module")
def image_pgm():
    # The image preset: registers and conditioning without SiLU, on the efficient and the naive path.
    return randomized_model("pgm-img-tiny", vocab_size=CODEBOOK + 1, seq_len=65, num_classes=CLASSES,
                            image_grid=[8, 8])


@pytest.fixture(scope="module")
def image_mdlm():
    return randomized_model("mdlm-tiny", vocab_size=CODEBOOK + 1, seq_len=65, num_classes=CLASSES)


LABELS = torch.tensor([0, 3, 7, 9, 10])  # 10: the null label, an unconditional sample


def _record(log):
    def callback(step, query, logits):
        log.append((step, query.clone(), logits.clone()))
    return callback


# --- Halton order --------------------------------------------------------------------------


def _direct_halton(h, w):
    """First-occurrence cells of the Halton points n = 1, 2, ... (radical inverses, exact fractions)."""
    def radical_inverse(n, base):
        value, scale = Fraction(0), Fraction(1, base)
        while n:
            value += (n % base) * scale
            n, scale = n // base, scale / base
        return value

    cells, n = [], 0
    while len(cells) < h * w:
        n += 1
        cell = math.floor(h * radical_inverse(n, 2)) * w + math.floor(w * radical_inverse(n, 3))
        if cell not in cells:
            cells.append(cell)
    return cells


@pytest.mark.parametrize("h,w", [(8, 8), (32, 32), (6, 9), (5, 3)])
def test_halton_order_is_a_permutation_equal_to_the_halton_sequence(h, w):
    order = halton_order(h, w)
    assert order.dtype == torch.long and sorted(order.tolist()) == list(range(h * w))
    assert order.tolist() == _direct_halton(h, w)


def test_halton_order_spreads_its_first_points():
    # A Halton(2, 3) sequence is stratified per axis, not per quadrant: its points 1 and 3
    # are (1/2, 1/3) and (3/4, 1/9), both in the lower-left quadrant. What holds is that
    # the first 2^a * 3^b points fall in distinct (row / 2^a, column / 3^b) blocks.
    order = halton_order(8, 9)  # grid sides divisible by 2^3 and 3^2: each block is whole cells
    rows, cols = order // 9, order % 9
    for a, b in [(1, 1), (2, 0), (2, 1), (1, 2), (3, 2)]:
        first = 2 ** a * 3 ** b
        blocks = set(zip((rows[:first] // (8 // 2 ** a)).tolist(), (cols[:first] // (9 // 3 ** b)).tolist()))
        assert len(blocks) == first, (a, b)
    assert halton_order(8, 8)[:4].tolist() == [4 * 8 + 2, 2 * 8 + 5, 6 * 8 + 0, 1 * 8 + 3]


# --- arccos schedule -----------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens,steps_list", [(64, range(1, 65)), (1024, [4, 8, 32, 64, 1024])])
def test_arccos_counts_follow_the_schedule(n_tokens, steps_list):
    for steps in steps_list:
        counts = arccos_counts(n_tokens, steps)
        k = np.arange(1, steps + 1)
        known = np.maximum(k, np.floor(n_tokens * (1 - np.arccos(k / steps) / (np.pi / 2))).astype(int))
        assert counts == np.diff(known, prepend=0).tolist(), steps
        assert len(counts) == steps and sum(counts) == n_tokens and min(counts) >= 1
        # The schedule is convex: the counts grow, up to one token of floor rounding,
        # and the last step reveals the most.
        assert all(later >= earlier - 1 for earlier, later in zip(counts, counts[1:])), counts
        assert counts[-1] == max(counts)
    assert arccos_counts(64, 8) == [5, 5, 5, 6, 6, 7, 9, 21]
    assert arccos_counts(n_tokens, n_tokens) == [1] * n_tokens


def test_arccos_counts_refuse_more_steps_than_tokens():
    with pytest.raises(ValueError, match="at most 64 steps"):
        arccos_counts(64, 65)
    with pytest.raises(ValueError, match=">= 1"):
        arccos_counts(64, 0)


# --- samplers -------------------------------------------------------------------------------


def _known_before(log):
    """Per step: the positions known before it (BOS + earlier queries), LongTensor[N, C]."""
    known = [torch.zeros(log[0][1].shape[0], 1, dtype=torch.long)]
    for _, query, _ in log:
        known.append(torch.cat([known[-1], query], dim=1))
    return known[:-1]


@pytest.mark.parametrize("order", ["halton", "random"])
def test_pgm_sampler_matches_the_naive_full_forward_and_reveals_every_cell_once(image_pgm, order):
    log = []
    out = sample_image_pgm(image_pgm, LABELS, 6, order=order, generator=torch.Generator().manual_seed(0),
                           callback=_record(log))
    assert out.shape == (5, 65) and (out[:, 0] == BOS).all()
    assert ((0 <= out[:, 1:]) & (out[:, 1:] < CODEBOOK)).all()  # no BOS (nor anything else) in the grid
    queries = torch.cat([query for _, query, _ in log], dim=1)
    assert (queries.sort(dim=1).values == torch.arange(1, 65)).all()
    assert [query.shape[1] for _, query, _ in log] == arccos_counts(64, 6)
    if order == "halton":
        assert (queries == halton_order(8, 8) + 1).all()
    else:
        assert not (queries == queries[0]).all(), "each image draws its own random order"
    with torch.no_grad():
        for (step, query, logits), known in zip(log, _known_before(log)):
            groups = torch.ones(out.shape, dtype=torch.bool).scatter(1, known, False)
            full = image_pgm(out, groups, labels=LABELS)  # group 1 sees group 0 only: later cells are hidden
            naive = full.gather(1, query[..., None].expand(-1, -1, full.shape[-1]))[..., :CODEBOOK]
            torch.testing.assert_close(logits, naive, atol=1e-4, rtol=1e-4)


def test_tokens_are_drawn_from_the_logits_times_temperature_halved_on_the_first_step(image_pgm):
    log = []
    out = sample_image_pgm(image_pgm, LABELS, 4, temperature=3.0, generator=torch.Generator().manual_seed(5),
                           callback=_record(log))
    generator = torch.Generator().manual_seed(5)  # the Halton order draws nothing: the steps' draws come first
    for step, query, logits in log:
        expected = sample_categorical(logits * (1.5 if step == 0 else 3.0), generator)
        assert torch.equal(out.gather(1, query), expected), step


@pytest.mark.parametrize("ramp", ["linear", "constant"])
def test_guided_logits_are_the_cfg_combination_of_separate_calls(image_pgm, ramp):
    log, steps, cfg = [], 4, 3.0
    out = sample_image_pgm(image_pgm, LABELS, steps, cfg=cfg, cfg_ramp=ramp,
                           generator=torch.Generator().manual_seed(1), callback=_record(log))
    null = torch.full_like(LABELS, CLASSES)
    with torch.no_grad():
        for (step, query, logits), known in zip(log, _known_before(log)):
            cond, uncond = (image_pgm.predict(out.gather(1, known), known, query, labels=labels)[..., :CODEBOOK]
                            for labels in (LABELS, null))
            assert not torch.allclose(cond[:4], uncond[:4], atol=1e-2), "the null label must change the logits"
            w = cfg * step / (steps - 1) if ramp == "linear" else cfg
            torch.testing.assert_close(logits, (1 + w) * cond - w * uncond, atol=1e-4, rtol=1e-4)
            # The null label's own row is unguided: cond == uncond there.
            torch.testing.assert_close(logits[4], cond[4], atol=1e-4, rtol=1e-4)


def test_zero_guidance_is_conditional_sampling(image_pgm):
    """A linear ramp starts at w = 0: its first step must be the unguided conditional step."""
    logs, outs = {}, {}
    for cfg in (0.0, 5.0):
        logs[cfg] = []
        outs[cfg] = sample_image_pgm(image_pgm, LABELS, 4, cfg=cfg, generator=torch.Generator().manual_seed(2),
                                     callback=_record(logs[cfg]))
    (_, query0, plain0), (_, query5, guided0) = logs[0.0][0], logs[5.0][0]
    torch.testing.assert_close(guided0, plain0, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0.0].gather(1, query0), outs[5.0].gather(1, query5))
    assert not torch.equal(outs[0.0], outs[5.0]), "guidance at later steps must change the samples"


def test_mdlm_baseline_reads_the_full_masked_sequence_in_the_same_order(image_mdlm):
    log = []
    out = sample_image_mdlm(image_mdlm, LABELS, 5, cfg=2.0, generator=torch.Generator().manual_seed(3),
                            callback=_record(log))
    assert out.shape == (5, 65) and (out[:, 0] == BOS).all() and (out[:, 1:] < CODEBOOK).all()
    assert (torch.cat([query for _, query, _ in log], dim=1) == halton_order(8, 8) + 1).all()
    null = torch.full_like(LABELS, CLASSES)
    with torch.no_grad():
        for (step, query, logits), known in zip(log, _known_before(log)):
            masked = torch.full_like(out, image_mdlm.config.mask_id).scatter(1, known, out.gather(1, known))
            cond, uncond = (image_mdlm(masked, labels=labels).gather(1, query[..., None].expand(-1, -1, 18))
                            [..., :CODEBOOK] for labels in (LABELS, null))
            w = 2.0 * step / 4
            torch.testing.assert_close(logits, (1 + w) * cond - w * uncond, atol=1e-4, rtol=1e-4)


def test_sampler_errors(image_pgm):
    with pytest.raises(ValueError, match="at most 64 steps"):
        sample_image_pgm(image_pgm, LABELS, 65)
    with pytest.raises(ValueError, match="does not fill"):
        sample_image_pgm(image_pgm, LABELS, 4, grid=(4, 8))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        sample_image_pgm(image_pgm, torch.tensor([11]), 4)
    with pytest.raises(ValueError, match="cfg_ramp"):
        sample_image_pgm(image_pgm, LABELS, 4, cfg=1.0, cfg_ramp="cosine")
    with pytest.raises(ValueError, match="class-conditional"):
        sample_image_pgm(randomized_model("pgm-tiny", vocab_size=18, seq_len=65), LABELS, 4)
    with pytest.raises(ValueError, match="square"):
        sample_image_pgm(randomized_model("pgm-tiny", vocab_size=18, seq_len=33, num_classes=10), LABELS, 4)


# --- pictures -------------------------------------------------------------------------------


def test_grid_array_places_scaled_cells_between_white_gaps(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 2, 5, 3)).astype(np.float32)  # rows, cols, H, W, RGB; H != W on purpose
    pixels[0, 0, 0, 0] = 0.5  # rounds to 128, where truncation would give 127
    out = grid_array(pixels, scale=2, gap=1)
    assert out.dtype == np.uint8 and out.shape == (2 * 4 + 1, 3 * 10 + 2, 3)
    for r in range(2):
        for c in range(3):
            cell = out[r * 5:r * 5 + 4, c * 11:c * 11 + 10]
            expected = np.kron(np.rint(pixels[r, c] * 255), np.ones((2, 2, 1)))
            assert np.array_equal(cell, expected), (r, c)
    assert (out[4] == 255).all() and (out[:, 10] == 255).all() and (out[:, 21] == 255).all()
    assert out[0, 0, 0] == 128
    saved = save_grid(pixels, tmp_path / "sub" / "grid.png", scale=2, gap=1)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), out)


def test_digits_pixels_are_grey_levels_over_16_drawn_grey():
    codes = np.array([[[0, 8], [16, 4]]])
    pixels = digits_pixels(codes)
    assert pixels.shape == (1, 2, 2, 1) and np.allclose(pixels[..., 0], codes / 16)
    out = grid_array(pixels[None], scale=1, gap=0)  # one row, one column
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 128], [255, 64]]
    assert (out == out[..., :1]).all(), "grey images are repeated over the channels"
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        digits_pixels(np.array([17]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        grid_array(np.full((1, 1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="rows, cols"):
        grid_array(np.zeros((2, 2, 2)))


# --- digits classifier and diversity ----------------------------------------------------------


def test_digits_classifier_separates_the_val_split_and_is_cached(tmp_path):
    (train_grids, train_labels), (val_grids, val_labels) = digits_split()
    classifier = digits_classifier(tmp_path)
    assert class_accuracy(classifier, val_grids, val_labels) > 0.9
    assert class_accuracy(classifier, val_grids, (val_labels + 1) % 10) < 0.05
    (cached,) = tmp_path.glob("digits-classifier-*.npz")
    with np.load(cached, allow_pickle=False) as saved:
        assert set(saved.files) == {"coef", "intercept"} and np.array_equal(saved["coef"], classifier.coef)
    np.savez(cached, coef=np.zeros_like(classifier.coef), intercept=np.arange(10.0))
    assert (digits_classifier(tmp_path).predict(val_grids) == 9).all(), "the second call must read the cache"
    shuffled = fit_digits_classifier(train_grids, np.random.default_rng(0).permutation(train_labels))
    assert class_accuracy(shuffled, val_grids, val_labels) < 0.2  # chance is 0.1


def test_diversity_is_the_mean_within_class_pairwise_distance():
    points = np.array([[0, 0], [3, 0], [0, 0], [3, 0], [0, 4], [9, 9]], dtype=float)
    labels = np.array([0, 0, 1, 1, 1, 2])  # class 0: one pair at 3; class 1: 3, 4, 5; class 2: alone
    assert diversity(points, labels) == pytest.approx((3 + (3 + 4 + 5) / 3) / 2)
    rng = np.random.default_rng(1)
    pixels, labels = rng.random((12, 4, 4, 1)), rng.integers(0, 3, 12)
    flat = pixels.reshape(12, -1)
    per_class = [np.mean([np.linalg.norm(flat[i] - flat[j]) for i in np.flatnonzero(labels == c)
                          for j in np.flatnonzero(labels == c) if i < j]) for c in range(3)]
    assert diversity(pixels, labels) == pytest.approx(np.mean(per_class))
    assert diversity(np.repeat(pixels[:1], 5, axis=0), np.zeros(5)) == 0.0


# --- FID --------------------------------------------------------------------------------------


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_distance_on_gaussians_with_known_distances():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2, sigma = rng.normal(size=d), rng.normal(size=d), _random_spd(rng, d)
    assert frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diagonal, rel=1e-8)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenvectors: same closed form
    assert frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T, mu2,
                            rotation @ np.diag(b) @ rotation.T) == pytest.approx(diagonal, rel=1e-8)
    # General (non-commuting) covariances: tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), by eigh.
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class _ChannelMoments(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 6]
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_fid_through_a_torchscript_features_file(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(_ChannelMoments()).save(str(path))
    extractor = load_feature_extractor(path)
    generator = torch.Generator().manual_seed(0)
    real = [torch.rand(64, 3, 8, 8, generator=generator) for _ in range(3)]
    darker = [0.5 * batch for batch in real]
    features = extract_features(extractor, real)
    assert features.shape == (192, 6) and features.dtype == np.float64
    np.testing.assert_allclose(features, _ChannelMoments()(torch.cat(real)).double().numpy(), rtol=1e-6)
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    centred = features - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(features) - 1))
    # Halving the images halves every feature: mu -> mu/2, sigma -> sigma/4, so the distance
    # is |mu/2|^2 + tr(sigma) (1 + 1/4 - 2 * 1/2) = |mu|^2 / 4 + tr(sigma) / 4.
    assert fid(features, extract_features(extractor, darker)) == pytest.approx(
        (mu @ mu + np.trace(sigma)) / 4, rel=1e-5)
    assert fid(features, features) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(FileNotFoundError):
        load_feature_extractor(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        load_feature_extractor(tmp_path / "junk.pt")
