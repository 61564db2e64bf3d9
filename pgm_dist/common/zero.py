"""Views of parameters under ZeRO-3.

Under ZeRO-3 every parameter is a placeholder whose values live as this rank's flat slice
``p.ds_tensor`` (``ceil(numel / W)`` elements: rank r holds elements ``[r*s, (r+1)*s)`` of the
flattened parameter, zero-padded past its end; W is the world size: pgm_dist is data-parallel
only, so ZeRO partitions over every rank). The EMA (:mod:`pgm_dist.training.ema`) keeps only
that slice per rank: no gather per step; it consolidates the whole weights (collective) for
checkpoints and distillation, and takes this rank's slice of whole weights at a restore.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its values are in ``p.ds_tensor``)."""
    return hasattr(p, "ds_tensor")


def local_values(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``p``: its flat ZeRO-3 partition [ceil(numel / W)], else ``p`` itself."""
    return p.ds_tensor if is_partitioned(p) else p


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, also for a ZeRO-3 placeholder (whose ``numel()`` is 0)."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if is_partitioned(p) else p.shape


def partition_of(whole: torch.Tensor, partition_size: int, rank: int) -> torch.Tensor:
    """This rank's flat ZeRO-3 slice of a whole tensor: [partition_size], zero-padded past its end."""
    piece = whole.reshape(-1)[rank * partition_size:(rank + 1) * partition_size]
    return F.pad(piece, (0, partition_size - piece.numel()))


def _refresh_gathered(params) -> None:
    """ZeRO-3 keeps small parameters gathered between forwards ("persistent"): gather them again
    from the partitions just written (collective), or they would keep the values they had."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(gathered)
        gathered[0].all_gather(gathered)


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config dict asks for (0 when it has no ``zero_optimization``)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)
