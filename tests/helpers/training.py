"""Running the real entry point through the real ``deepspeed`` launcher, and reading back
what it wrote (TensorBoard events, checkpoints)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgm_dist.common.distributed import free_port, shared_memory_buffers
from pgm_dist.training.writer import TOKENS_DIR

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def run_train(args: list[str], *, ranks: int | None = None, env: dict | None = None, timeout: int = 600,
              check: bool = True, launcher: bool = True, script: str = "pgm_dist/train.py") -> subprocess.CompletedProcess:
    """``deepspeed [--num_gpus N] SCRIPT ARGS`` from the repository root (SCRIPT: train.py or distill.py)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // (ranks or 1))), "PYTHONUNBUFFERED": "1",
                **(env or {})}
    port = free_port()
    if launcher:
        cmd = [DEEPSPEED, "--master_port", str(port)]
        if ranks:
            cmd += ["--num_gpus", str(ranks)]
    else:
        cmd = [sys.executable]
    cmd += [script, "--no-progress", *args]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:  # what a killed run could not unlink itself (a finished one does, pgm_dist.training.session.run)
        for path in shared_memory_buffers("127.0.0.1", str(port)):
            path.unlink(missing_ok=True)
    if check and done.returncode != 0:
        raise AssertionError(f"training failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def scalar_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event TensorBoard's reader keeps (after its purges), in file order:
    {tag: [(step, value), ...]}, the step axis of ``log_dir`` and the ``by_tokens/`` tags of
    ``log_dir/by_tokens`` (whose "steps" are tokens seen)."""
    events = {}
    for folder in (log_dir, log_dir / TOKENS_DIR):
        if not folder.is_dir():  # a run written before the token axis had its own folder
            continue
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        events.update({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    return events


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of a run's TensorBoard folder, both axes: {tag: {step: value}} (later events win)."""
    return {tag: dict(events) for tag, events in scalar_events(log_dir).items()}


def text_tags(log_dir: Path) -> list[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tags()["tensors"]


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
