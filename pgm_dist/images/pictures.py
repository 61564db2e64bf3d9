"""Sample pictures: a rows x cols grid of images as a uint8 array (TensorBoard) or a PNG file.

Pixels come in as floats in [0, 1]: the digits' grey levels through :func:`digits_pixels`,
VQ codes through ``VQModel.decode_pixels``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pgm_dist.images.data import DIGITS_LEVELS
from pgm_dist.images.sampling import sample_image_pgm
from pgm_dist.images.vq import load_vq

GAP_VALUE = 255  # white lines between the cells (digits are light strokes on black)


def digits_pixels(codes) -> np.ndarray:
    """Digits grey levels ``[..., H, W]`` (ints 0..16) -> ``float32 [..., H, W, 1]`` in [0, 1] (level / 16)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= DIGITS_LEVELS):
        raise ValueError(f"digits grey levels must lie in [0, {DIGITS_LEVELS}), got {codes.min()}..{codes.max()}")
    return (codes.astype(np.float32) / (DIGITS_LEVELS - 1))[..., None]


def grid_array(pixels, scale: int = 1, gap: int = 2) -> np.ndarray:
    """Images ``[rows, cols, H, W]`` or ``[rows, cols, H, W, C]`` (C = 1 or 3) in [0, 1] -> ``uint8 [H', W', 3]``.

    Each image is enlarged ``scale`` times (nearest neighbour, so 8x8 digits stay sharp);
    ``gap`` white pixels separate the cells. The result is RGB (grey images repeated over
    the channels), ready for PIL or ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 4:
        pixels = pixels[..., None]
    if pixels.ndim != 5 or pixels.shape[-1] not in (1, 3) or 0 in pixels.shape:
        raise ValueError(f"pixels must be [rows, cols, H, W] or [rows, cols, H, W, 1 or 3], got {pixels.shape}")
    if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise ValueError(f"pixels must lie in [0, 1], got {np.nanmin(pixels)}..{np.nanmax(pixels)}")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be >= 1 and gap >= 0, got scale={scale}, gap={gap}")
    rows, cols, h, w, _ = pixels.shape
    cells = np.rint(pixels * 255).astype(np.uint8).repeat(scale, axis=2).repeat(scale, axis=3)
    cells = np.broadcast_to(cells, (*cells.shape[:4], 3))
    h, w = h * scale, w * scale
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), GAP_VALUE, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = cells[r, c]
    return out


def save_grid(pixels, path: str | Path, scale: int = 1, gap: int = 2) -> Path:
    """Write :func:`grid_array` of ``pixels`` as a PNG at ``path``; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(pixels, scale, gap)).save(path, format="PNG")
    return path


def pixel_decoder(vq_path: str | Path | None, device: str | torch.device = "cpu"
                  ) -> Callable[[torch.Tensor], np.ndarray]:
    """Codes ``LongTensor[N, h, w]`` -> pixels ``float32 [N, H, W, C]`` in [0, 1]: the grey levels
    themselves for the digits (``vq_path`` None), else the VQ decoder of an image folder, on ``device``."""
    if vq_path is None:
        return lambda codes: digits_pixels(codes.cpu().numpy())

    vq = load_vq(vq_path).to(device).eval()

    @torch.no_grad()
    def decode(codes: torch.Tensor) -> np.ndarray:
        return vq.decode_pixels(codes)

    return decode


def sample_pictures(model, classes: Sequence[int], per_class: int, steps: int,
                    decode: Callable[[torch.Tensor], np.ndarray], **sampler) -> np.ndarray:
    """``per_class`` samples of each class (one row per class) through the efficient Halton
    sampler (``sampler``: cfg, cfg_ramp, temperature, order, generator) and ``decode``:
    pixels ``[len(classes), per_class, H, W, C]`` in [0, 1], for :func:`grid_array` / :func:`save_grid`."""

    h, w = model.config.image_grid
    labels = torch.tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)
    tokens = sample_image_pgm(model, labels, steps, **sampler)
    pixels = decode(tokens[:, 1:].reshape(-1, h, w))
    return pixels.reshape(len(classes), per_class, *pixels.shape[1:])
