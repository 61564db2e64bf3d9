"""Image samplers (section 9 of docs/pgm-algorithm.md): Halton order, arccos schedule, CFG.

A sample is the sequence ``[BOS, c_0, ..., c_{HW-1}]`` (row-major grid, BOS =
codebook size = ``vocab_size - 1``). Each step reveals the next ``arccos_counts``
cells of a fixed order (the 2-D Halton order, or a uniform random one per image),
drawn from classifier-free-guided logits ``(1 + w_k) cond - w_k uncond`` with the
null label ``num_classes`` in one doubled batch. As in the reference sampler,
``temperature`` multiplies the logits and is halved on the first step, and ``w_k``
ramps linearly from 0 at the first step to ``cfg`` at the last.

``sample_image_pgm`` is the efficient path (the network sees the clean tokens and
this step's queries only); ``sample_image_mdlm`` is the MaskGIT-style baseline for a
full-length masked model, with the same order, counts and guidance, so the two
compare at equal steps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from pgm_dist.sampling import _device, _eval_mode, sample_categorical

ORDERS = ("halton", "random")
CFG_RAMPS = ("linear", "constant")
# callback(step, query_positions [N, Q], logits [N, Q, K]): the guided logits over the K
# codes before temperature, for the Q positions this step reveals.
StepCallback = Callable[[int, Tensor, Tensor], None]
# logits_at(tokens [B, L], clean_positions [B, C], query_positions [B, Q], labels [B]) -> [B, Q, >= K]
LogitsAt = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _radical_inverse(n: int, base: int) -> tuple[int, int]:
    """The base-``base`` digits of ``n`` mirrored behind the point, as (numerator, denominator)."""
    numerator, denominator = 0, 1
    while n:
        n, digit = divmod(n, base)
        numerator, denominator = numerator * base + digit, denominator * base
    return numerator, denominator


def _power_at_least(base: int, n: int) -> int:
    power = 1
    while power < n:
        power *= base
    return power


def halton_order(h: int, w: int) -> Tensor:
    """The 2-D Halton order of an ``h x w`` grid: LongTensor[h*w] of row-major cells ``y*w + x``.

    Point ``n = 1, 2, ...`` of the Halton sequence (base 2 for the row, base 3 for the
    column, the reference's axes; its sequence starts at n = 1, not at the origin) falls
    in cell ``(floor(h * r_2(n)), floor(w * r_3(n)))``; each cell keeps the rank of its
    first point. Integer arithmetic, so cells on exact boundaries are never misplaced.
    """
    if h < 1 or w < 1:
        raise ValueError(f"the grid must be at least 1x1, got {h}x{w}")
    # Any 2^a * 3^b consecutive indices hit every (row 2^-a, column 3^-b) box once; with
    # 2^a >= 2h and 3^b >= 2w each cell contains such a box, so this many points cover the grid.
    limit = _power_at_least(2, 2 * h) * _power_at_least(3, 2 * w)
    seen: dict[int, None] = {}
    for n in range(1, limit + 1):
        (num2, den2), (num3, den3) = _radical_inverse(n, 2), _radical_inverse(n, 3)
        seen.setdefault((num2 * h // den2) * w + num3 * w // den3)
        if len(seen) == h * w:
            return torch.tensor(list(seen), dtype=torch.long)
    raise AssertionError(f"the Halton points did not cover the {h}x{w} grid")  # excluded by the bound above


def arccos_counts(n_tokens: int, steps: int) -> list[int]:
    """Tokens revealed at each of ``steps`` steps, summing to ``n_tokens``.

    After step ``k`` (0-based), ``max(k + 1, floor(n_tokens * (1 - arccos((k+1)/steps) / (pi/2))))``
    tokens are known: MaskGIT's arccos schedule, at least one token per step. The counts
    grow towards the end (up to a floor rounding of one token) and the last is the largest.
    """
    if steps < 1 or n_tokens < 1:
        raise ValueError(f"steps and n_tokens must be >= 1, got steps={steps}, n_tokens={n_tokens}")
    if steps > n_tokens:
        raise ValueError(f"{steps} steps cannot each reveal a token of a {n_tokens}-token grid; "
                         f"use at most {n_tokens} steps")
    counts, known = [], 0
    for k in range(steps):
        now = max(k + 1, int(n_tokens * (1 - math.acos((k + 1) / steps) / (math.pi / 2))))
        counts.append(now - known)
        known = now
    return counts


def guidance_weights(cfg: float, steps: int, ramp: str) -> list[float]:
    """``w_k`` per step: ``linear`` ramps 0 -> cfg over the steps (cfg for a single step), ``constant`` is cfg."""
    if ramp not in CFG_RAMPS:
        raise ValueError(f"unknown cfg_ramp {ramp!r}; valid: {', '.join(CFG_RAMPS)}")
    if not cfg >= 0:
        raise ValueError(f"the guidance weight cfg must be >= 0, got {cfg}")
    if ramp == "constant" or steps == 1:
        return [float(cfg)] * steps
    return [cfg * k / (steps - 1) for k in range(steps)]


def image_grid(config, grid: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the model's ``1 + h*w`` sequence: ``grid`` checked, else the config's
    ``image_grid``, else the square one."""
    cells = config.seq_len - 1
    grid = grid or getattr(config, "image_grid", None)
    if grid is None:
        side = math.isqrt(cells)
        if side * side != cells:
            raise ValueError(f"seq_len {config.seq_len} is not 1 + a square grid; pass grid=(h, w)")
        return side, side
    h, w = grid
    if h * w != cells:
        raise ValueError(f"grid {h}x{w} does not fill the model's seq_len {config.seq_len} (1 + h*w)")
    return h, w


def _check_labels(config, labels: Tensor) -> None:
    if not config.num_classes:
        raise ValueError("image sampling needs a class-conditional model (config.num_classes)")
    if labels.dim() != 1 or labels.dtype != torch.long:
        raise ValueError(f"labels must be a LongTensor[N], got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= config.num_classes:
        raise ValueError(f"labels must be in [0, {config.num_classes}] ({config.num_classes} = the null label)")


@torch.no_grad()
def _sample(model, labels: Tensor, steps: int, logits_at: LogitsAt, blank_id: int, *, grid, cfg: float,
            cfg_ramp: str, temperature: float, order: str, generator, callback: StepCallback | None) -> Tensor:
    """The loop both samplers share; ``logits_at`` is the network call. -> LongTensor[N, 1 + h*w]."""
    config = model.config
    _check_labels(config, labels)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature multiplies the logits and must be positive, got {temperature}")
    h, w = image_grid(config, grid)
    counts = arccos_counts(h * w, steps)
    weights = guidance_weights(cfg, steps, cfg_ramp)
    codebook = config.vocab_size - 1  # BOS = codebook size: the last id, never drawn
    device = _device(model)
    labels = labels.to(device)
    n = labels.shape[0]
    if order == "halton":
        reveal_order = (halton_order(h, w).to(device) + 1).expand(n, -1)
    else:
        reveal_order = torch.rand(n, h * w, generator=generator, device=device).argsort(dim=1) + 1
    tokens = torch.full((n, 1 + h * w), blank_id, dtype=torch.long, device=device)
    tokens[:, 0] = codebook
    bos = torch.zeros(n, 1, dtype=torch.long, device=device)
    null = torch.full_like(labels, config.num_classes)
    known = 0
    with _eval_mode(model):
        for step, (count, weight) in enumerate(zip(counts, weights)):
            clean = torch.cat([bos, reveal_order[:, :known]], dim=1)
            query = reveal_order[:, known:known + count]
            if cfg == 0:
                logits = logits_at(tokens, clean, query, labels)[..., :codebook]
            else:  # one doubled batch: conditional rows first, then the null label's
                doubled = logits_at(tokens.repeat(2, 1), clean.repeat(2, 1), query.repeat(2, 1),
                                    torch.cat([labels, null]))[..., :codebook]
                cond, uncond = doubled.chunk(2)
                logits = (1 + weight) * cond - weight * uncond
            if callback is not None:
                callback(step, query, logits)
            scale = temperature * (0.5 if step == 0 else 1.0)
            tokens.scatter_(1, query, sample_categorical(logits * scale, generator))
            known += count
    return tokens


def sample_image_pgm(model, labels: Tensor, steps: int, *, grid: tuple[int, int] | None = None, cfg: float = 0.0,
                     cfg_ramp: str = "linear", temperature: float = 1.0, order: str = "halton",
                     generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Sample one image per label with a class-conditional PGM: LongTensor[N, 1 + h*w].

    labels: LongTensor[N] in [0, num_classes] (num_classes = unconditional). Each step
    runs ``model.predict`` on BOS + the revealed cells and queries only this step's cells.
    grid: (h, w), or None for the square grid of ``seq_len - 1`` cells.
    """
    def logits_at(tokens, clean, query, step_labels):
        return model.predict(tokens.gather(1, clean), clean, query, labels=step_labels)

    # Unrevealed cells are never read on this path: any id can hold their place.
    return _sample(model, labels, steps, logits_at, 0, grid=grid, cfg=cfg, cfg_ramp=cfg_ramp,
                   temperature=temperature, order=order, generator=generator, callback=callback)


def sample_image_mdlm(model, labels: Tensor, steps: int, *, grid: tuple[int, int] | None = None, cfg: float = 0.0,
                      cfg_ramp: str = "linear", temperature: float = 1.0, order: str = "halton",
                      generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """The MaskGIT-style baseline for a class-conditional MDLM: LongTensor[N, 1 + h*w].

    Every step runs the network on the full sequence (MASK at the unrevealed cells) and
    reads the logits of this step's cells; order, counts and guidance as ``sample_image_pgm``.
    """
    def logits_at(tokens, clean, query, step_labels):
        logits = model(tokens, labels=step_labels)
        return logits.gather(1, query[..., None].expand(-1, -1, logits.shape[-1]))

    return _sample(model, labels, steps, logits_at, model.config.mask_id, grid=grid, cfg=cfg, cfg_ramp=cfg_ramp,
                   temperature=temperature, order=order, generator=generator, callback=callback)
