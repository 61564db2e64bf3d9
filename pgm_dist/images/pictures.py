"""Sample pictures: a rows x cols grid of images as a uint8 array (TensorBoard) or a PNG file.

Pixels come in as floats in [0, 1]: the digits' grey levels through :func:`digits_pixels`,
VQ codes through ``VQModel.decode_pixels``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pgm_dist.data.images import DIGITS_LEVELS

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
