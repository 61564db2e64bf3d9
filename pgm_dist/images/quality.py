"""Sample quality for images: a digits classifier (class accuracy, diversity) and FID.

Digits: a scikit-learn logistic regression on the training split of the digits shards
(``pgm_dist.images.data.digits_split``), fit once and cached as an ``.npz`` of its
coefficients (never a pickle) under a name keyed by a hash of the data and settings.

FID: the Frechet distance between Gaussians fitted to features of real and generated
images. The feature network is a TorchScript file (``load_feature_extractor``) mapping
images ``float [N, 3, H, W]`` in [0, 1] to ``[N, D]``, since Inception weights cannot be
downloaded here. ``benchmarks/inception_features.py`` writes the usual one (Inception-v3
pool3, 2048-d, the TF-ported FID weights, traced from pytorch-fid) as ``inception_pool3.pt``
on a machine with internet; pass that file as the features file. FIDs are comparable with
published numbers only with these weights and the reference set's statistics computed the
same way.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pgm_dist.images.data import DIGITS_LEVELS, ImageFolderListing, digits_split
from pgm_dist.images.pictures import digits_pixels
from pgm_dist.images.sampling import sample_image_pgm

CLASSIFIER_C = 1.0  # scikit-learn's default L2 strength; the val accuracy is ~0.96 (tests/unit/images/test_image_sampling.py)
CLASSIFIER_MAX_ITER = 5000
FID_IMAGINARY_TOLERANCE = 1e-3  # of sqrtm's imaginary parts, relative to its largest real entry


@dataclass(frozen=True)
class DigitsClassifier:
    """A linear classifier of 8x8 digits: ``coef [10, 64]``, ``intercept [10]`` on grey level / 16."""

    coef: np.ndarray
    intercept: np.ndarray

    def predict(self, grids) -> np.ndarray:
        """Grey-level grids ``[N, 8, 8]`` (0..16) -> predicted classes ``int64 [N]``."""
        x = _features(grids)
        if x.shape[1] != self.coef.shape[1]:
            raise ValueError(f"the classifier takes {self.coef.shape[1]}-pixel grids, got {x.shape[1]} pixels")
        return (x @ self.coef.T + self.intercept).argmax(axis=1)


def _features(grids) -> np.ndarray:
    grids = np.asarray(grids)
    return grids.reshape(len(grids), -1).astype(np.float64) / (DIGITS_LEVELS - 1)


def fit_digits_classifier(grids: np.ndarray, labels: np.ndarray) -> DigitsClassifier:
    """Fit the logistic regression on grey-level grids ``[N, 8, 8]`` and labels ``[N]``."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # One BLAS thread: on this small problem, threads contending with torch's OpenMP pool made
    # the fit 60x slower (6.5 s instead of 0.1 s on 2 cores).
    with threadpool_limits(1):
        model = LogisticRegression(C=CLASSIFIER_C, max_iter=CLASSIFIER_MAX_ITER).fit(_features(grids), labels)
    if not np.array_equal(model.classes_, np.arange(len(model.classes_))):
        raise ValueError(f"labels must be 0..C-1 with every class present, got classes {model.classes_}")
    return DigitsClassifier(model.coef_.copy(), model.intercept_.copy())


def digits_classifier(cache_dir: str | Path) -> DigitsClassifier:
    """The classifier fit on the digits' training split, loaded from ``cache_dir`` when cached there."""
    from sklearn import __version__ as sklearn_version

    (grids, labels), _ = digits_split()
    key = hashlib.sha256()
    for part in (grids.tobytes(), labels.tobytes(), f"{CLASSIFIER_C} {CLASSIFIER_MAX_ITER} {sklearn_version}".encode()):
        key.update(part)
    path = Path(cache_dir) / f"digits-classifier-{key.hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            return DigitsClassifier(saved["coef"], saved["intercept"])
    classifier = fit_digits_classifier(grids, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, coef=classifier.coef, intercept=classifier.intercept)
    os.replace(partial, path)  # a reader never sees half a file
    return classifier


def class_accuracy(classifier: DigitsClassifier, grids, labels) -> float:
    """Fraction of grids ``[N, 8, 8]`` that the classifier assigns to their label ``[N]``."""
    labels = np.asarray(labels)
    if len(labels) != len(grids) or not len(labels):
        raise ValueError(f"need as many labels as grids (and at least one), got {len(labels)} and {len(grids)}")
    return float((classifier.predict(grids) == labels).mean())


def diversity(pixels, labels) -> float:
    """Mean pairwise L2 distance of the images ``[N, ...]`` of each class, averaged over the classes.

    Distances are in the pixels' own units (e.g. :func:`pgm_dist.images.pictures.digits_pixels`,
    in [0, 1]); classes with fewer than two images are skipped. 0 means every class collapsed
    to one picture.
    """
    from scipy.spatial.distance import pdist

    x = np.asarray(pixels, dtype=np.float64)
    x = x.reshape(len(x), -1)
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"need one label per image, got {len(labels)} labels for {len(x)} images")
    per_class = [pdist(x[labels == c]).mean() for c in np.unique(labels) if (labels == c).sum() >= 2]
    if not per_class:
        raise ValueError("diversity needs a class with at least two images")
    return float(np.mean(per_class))


# --- FID ---------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, D]`` -> (mean ``[D]``, covariance ``[D, D]``, unbiased), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` between two Gaussians."""
    from scipy.linalg import sqrtm

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions): offset both diagonals slightly.
        offset = np.eye(d) * 1e-6
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # The product of two PSD matrices has a real square root; rounding leaves small imaginary parts.
        imaginary = np.abs(covmean.imag).max()
        if imaginary > FID_IMAGINARY_TOLERANCE * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary parts up to {imaginary:.3g}: "
                             "are both covariances symmetric positive semi-definite?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_feature_extractor(path: str | Path,
                           device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A TorchScript file mapping images ``float [N, 3, H, W]`` in [0, 1] to features ``[N, D]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no features file at {path} (a TorchScript module; see this module's docstring)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript module ({str(err).splitlines()[0]}); "
                         "save one with torch.jit.trace(...).save(path)") from None


@torch.no_grad()
def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor],
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Features ``float64 [N, D]`` of image batches ``[B, 3, H, W]`` in [0, 1]."""
    out = []
    for batch in images:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"image batches must be [B, 3, H, W], got {tuple(batch.shape)}")
        features = extractor(batch.to(device).float())
        if features.ndim != 2 or features.shape[0] != batch.shape[0]:
            raise ValueError(f"the extractor must return [B, D] features, got {tuple(features.shape)} "
                             f"for a batch of {batch.shape[0]}")
        out.append(features.double().cpu().numpy())
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)


def fid(real_features, generated_features) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(generated_features))


# --- digits: quality per sampler setting ----------------------------------------------------------


def digits_quality(model, classifier: DigitsClassifier, steps: Iterable[int], cfgs: Iterable[float],
                   per_class: int = 20, seed: int = 0, order: str = "halton") -> list[dict]:
    """Class accuracy and within-class diversity of ``per_class`` samples of each digit, for
    each (steps, cfg): ``[{"steps", "cfg", "accuracy", "diversity"}]``. The same seed for every
    setting, so the rows differ only by the setting."""

    classes = model.config.num_classes
    labels = torch.arange(classes).repeat_interleave(per_class)
    h, w = model.config.image_grid
    rows = []
    for k in steps:
        for cfg in cfgs:
            generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
            tokens = sample_image_pgm(model, labels, k, cfg=cfg, order=order, generator=generator)
            grids = tokens[:, 1:].reshape(-1, h, w).cpu().numpy()
            rows.append({"steps": k, "cfg": cfg, "accuracy": class_accuracy(classifier, grids, labels.numpy()),
                         "diversity": diversity(digits_pixels(grids), labels.numpy())})
    return rows


# --- FID of an image model against a folder of real pictures (the reference's protocol) ----------

FID_SIZE = 299  # the Inception input side
IS_SPLITS = 10


def fid_inputs(pixels) -> torch.Tensor:
    """Pictures ``float [N, H, W, 3]`` in [0, 1] as the reference's FID prepares them (clean-fid's
    float PIL resizer in torch-fidelity's pipeline): ``x * 255`` as float, each channel resized by
    PIL bicubic to 299 x 299 (mode ``F``), clipped to [0, 255], truncated to uint8; returned as the
    feature file's input, ``float [N, 3, 299, 299]`` in [0, 1]."""
    from PIL import Image

    pixels = np.clip(np.asarray(pixels, dtype=np.float32) * 255.0, 0, 255)
    out = np.empty((len(pixels), 3, FID_SIZE, FID_SIZE), dtype=np.uint8)
    for n, picture in enumerate(pixels):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(picture[:, :, c]), mode="F")
            resized = np.asarray(channel.resize((FID_SIZE, FID_SIZE), Image.Resampling.BICUBIC))
            out[n, c] = np.clip(resized, 0, 255).astype(np.uint8)  # truncation, as torch's .to(uint8)
    return torch.from_numpy(out).float() / 255.0


def _run_extractor(extractor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features [B, D], logits [B, C] or None): a features file returns features, or (features, logits)."""
    out = extractor(batch)
    features, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    if features.ndim != 2 or features.shape[0] != batch.shape[0]:
        raise ValueError(f"the extractor must return [B, D] features, got {tuple(features.shape)}")
    return features.double().cpu(), None if logits is None else logits.double().cpu()


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``): ``exp E_x KL(p(y|x) || p(y))`` per split."""
    probs = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(-1).numpy()
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(marginal + 1e-30))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def model_fid(model, decode: Callable[[torch.Tensor], np.ndarray], real: ImageFolderListing,
              extractor: Callable[[torch.Tensor], torch.Tensor], *, num: int, steps: int, cfg: float,
              batch: int = 32, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """FID of ``model``'s samples against ``num`` real pictures (a seeded subset of ``real``), each
    generated picture drawn with the label of a real one: the generated labels are the real subset's
    multiset, as the reference's protocol (its validation split). Real pictures are prepared as the
    training data's (:func:`pgm_dist.images.data.load_picture`) at the decoder's size, both sets as
    :func:`fid_inputs`. Returns fid, num, labels and, when the extractor gives logits, the IS."""
    from tqdm import tqdm

    from pgm_dist.images.data import load_picture

    num = min(num, len(real.files))
    order = np.random.default_rng(seed).permutation(len(real.files))[:num]
    labels = torch.tensor([real.labels[i] for i in order], dtype=torch.long)
    h, w = model.config.image_grid
    generator = torch.Generator(device).manual_seed(seed)
    sets = {"real": [], "generated": []}
    logits = []
    bar = tqdm(total=2 * num, unit="img", desc="fid", disable=not progress)
    for start in range(0, num, batch):
        part = labels[start:start + batch]
        codes = sample_image_pgm(model, part.to(device), steps, cfg=cfg, generator=generator)[:, 1:]
        generated = decode(codes.reshape(-1, h, w))
        size = generated.shape[1]
        real_pixels = torch.stack([load_picture(real.files[i], size) for i in order[start:start + batch]])
        real_pixels = ((real_pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for name, pixels in (("real", real_pixels), ("generated", generated)):
            features, batch_logits = _run_extractor(extractor, fid_inputs(pixels).to(device))
            sets[name].append(features.numpy())
            if name == "generated" and batch_logits is not None:
                logits.append(batch_logits.numpy())
            bar.update(len(part))
    bar.close()
    result = {"fid": fid(np.concatenate(sets["real"]), np.concatenate(sets["generated"])), "num": num,
              "labels": labels.tolist()}
    if logits:
        result["inception_score"], result["inception_score_std"] = inception_score(np.concatenate(logits))
    return result
