"""Attention masks of a partition model and the backend registry.

Modes (``groups`` is ``BoolTensor[B, L]``, True = group 1):

- ``same_group``: query ``i`` sees key ``j`` iff ``groups[i] == groups[j]`` (PGM encoder);
- ``cross_group``: iff ``groups[i] != groups[j]`` (GroupSwap and PGM decoder);
- ``full``: every key, or the first ``key_lengths[b]`` keys of sequence ``b``
  (MDLM, and the PGM sampling path where padding may occur).

A query row with no visible key yields a zero output and zero gradients, never NaN.

One mask object is built per forward pass and shared by all layers, so a backend
may cache what it derives from it (a dense boolean mask, a flex block mask, a
group-sorted permutation) with :meth:`AttentionMask.cached`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MODES = ("same_group", "cross_group", "full")


class AttentionMask:
    """Which keys each query may attend to; see the module docstring."""

    def __init__(self, mode: str, groups: Tensor | None = None, key_lengths: Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown attention mode {mode!r}; valid: {', '.join(MODES)}")
        if (mode == "full") != (groups is None):
            raise ValueError(f"mode {mode!r} {'takes no' if mode == 'full' else 'needs'} groups")
        if groups is not None and groups.dtype != torch.bool:
            raise TypeError(f"groups must be a bool tensor, got {groups.dtype}")
        self.mode = mode
        self.groups = groups
        self.key_lengths = key_lengths
        self._cache: dict = {}

    @classmethod
    def same_group(cls, groups: Tensor) -> "AttentionMask":
        return cls("same_group", groups=groups)

    @classmethod
    def cross_group(cls, groups: Tensor) -> "AttentionMask":
        return cls("cross_group", groups=groups)

    @classmethod
    def full(cls, key_lengths: Tensor | None = None) -> "AttentionMask":
        return cls("full", key_lengths=key_lengths)

    @property
    def is_dense(self) -> bool:
        """True when every query sees every key (no mask needed at all)."""
        return self.mode == "full" and self.key_lengths is None

    def cached(self, key, build: Callable[[], object]):
        """Return ``build()`` computed once per mask object and key."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def allowed(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        """Dense ``BoolTensor[B or 1, 1, q_len, k_len]``: True where the query sees the key."""
        return self.cached(("allowed", q_len, k_len), lambda: self._allowed(q_len, k_len, device))

    def _allowed(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        if self.mode == "full":
            keys = torch.arange(k_len, device=device)
            if self.key_lengths is None:
                return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
            visible = keys[None, :] < self.key_lengths.to(device)[:, None]  # [B, k_len]
            return visible[:, None, None, :].expand(-1, 1, q_len, k_len)
        g = self.groups.to(device)
        if g.shape[1] != q_len or g.shape[1] != k_len:
            raise ValueError(f"groups of length {g.shape[1]} do not match {q_len} queries x {k_len} keys")
        same = g[:, :, None] == g[:, None, :]
        return (same if self.mode == "same_group" else ~same)[:, None]


Backend = Callable[[Tensor, Tensor, Tensor, AttentionMask], Tensor]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend, available: Callable[[], bool] = lambda: True) -> None:
    fn.available = available  # type: ignore[attr-defined]
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return [name for name, fn in _BACKENDS.items() if fn.available()]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map ``"auto"`` to the fastest backend available on ``device``; check others exist."""
    device = torch.device(device)
    if name == "auto":
        preference = ("triton", "flex", "reference") if device.type == "cuda" else ("reference",)
        return next(n for n in preference if n in available_backends())
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(_BACKENDS)}")
    if not _BACKENDS[name].available():
        raise RuntimeError(f"attention backend {name!r} is not available here; available: {available_backends()}")
    return name


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, backend: str = "auto") -> Tensor:
    """Masked softmax attention.

    q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; returns ``[B, H, Lq, D]`` in q's dtype.
    """
    return _BACKENDS[resolve_backend(backend, q.device)](q, k, v, mask)
