"""One attention interface for every call site of the models.

Call sites describe *which* keys each query may see with an :class:`AttentionMask`
and call :func:`attend`; a backend decides *how* to compute it. Backends know nothing
of the models.
"""
from pgm_dist.attention.interface import AttentionMask, attend, available_backends, resolve_backend

__all__ = ["AttentionMask", "attend", "available_backends", "resolve_backend"]

# Importing a backend module registers it.
from pgm_dist.attention import flex as _flex  # noqa: E402,F401
from pgm_dist.attention import reference as _reference  # noqa: E402,F401
from pgm_dist.attention import triton_backend as _triton  # noqa: E402,F401
