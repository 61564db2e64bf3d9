"""The one GPU-synchronised timer of the benchmarks (each script's folder is on ``sys.path``)."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn()`` over ``repeats`` back-to-back calls, the GPU synchronised
    before the clock starts and before it stops."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats
