"""Saving checkpoints during a run: when they are due, the save itself (every rank), the marker, pruning."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pgm_dist.checkpoints.format import _TAG, EMA_FILE, MARKER, STATE_FILE, complete_checkpoints, tag_for
from pgm_dist.common.distributed import DistEnv, all_reduce, barrier
from pgm_dist.common.files import write_json_atomic
from pgm_dist.data.shards import TOKENIZER_FILE

FAULT_ENV = "PGM_DIST_FAULT_KILL_IN_SAVE"  # "STEP:RANK": that rank kills itself mid-save (tests)


def _maybe_fault(step: int, rank: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointSpaceError(OSError):
    """Too little free disk for the next checkpoint; raised on every rank together."""


def checkpoint_bytes(root: Path) -> int | None:
    """What the newest complete checkpoint under ``root`` takes on disk (None before the first)."""
    done = complete_checkpoints(root)
    if not done:
        return None
    return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())


def check_free_space(root: Path, env: DistEnv, margin: float = 1.1) -> None:
    """Collective, before a save: every rank checks that its file system holds another checkpoint
    the size of the last one (x ``margin``), and all ranks learn together whether any cannot, so a
    full disk stops every rank with one message instead of leaving the others in a collective."""
    root.mkdir(parents=True, exist_ok=True)
    needed, free = checkpoint_bytes(root), shutil.disk_usage(root).free
    short = torch.tensor([float(needed is not None and free < margin * needed)])
    all_reduce(short, "max")
    if short.item() > 0:
        detail = (f"rank {env.rank}: {free / 2**30:.2f} GiB free, the last checkpoint took "
                  f"{needed / 2**30:.2f} GiB" if needed is not None and free < margin * needed else
                  "another rank's file system is short")
        raise CheckpointSpaceError(f"not enough free disk to save a checkpoint under {root} ({detail}): free "
                                   "space there or lower --keep-last, then resume; the last complete checkpoint "
                                   "is intact")


class Checkpointer:
    """Saves complete checkpoints every N steps and every M minutes; keeps the last k."""

    def __init__(self, root: Path, env: DistEnv, keep_last: int, every_steps: int, every_minutes: float):
        self.root, self.env, self.keep_last = Path(root), env, keep_last
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last_save = time.monotonic()

    def due_by_steps(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        """A local clock decision: the loop reduces it across ranks so that all agree."""
        return self.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.every_minutes

    def save(self, ds_engine, step: int, client_state: dict, state: dict, ema_weights: dict,
             tokenizer_path: Path | None, extra_files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Collective: every rank must call it. ``extra_files``: {file name: tensors} written by
        rank 0 as safetensors beside the shards, before the marker."""
        check_free_space(self.root, self.env)
        tag = tag_for(step)
        path = self.root / tag
        if self.env.is_main and path.exists():
            shutil.rmtree(path)  # a leftover incomplete save of the same step
        barrier()
        ds_engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _maybe_fault(step, self.env.rank)
        if self.env.is_main:
            for name, tensors in {EMA_FILE: ema_weights, **(extra_files or {})}.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / name))
            write_json_atomic(path / STATE_FILE, state)
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, path / TOKENIZER_FILE)
        barrier()
        if self.env.is_main:
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(f"{step}\n")
            os.replace(tmp, path / MARKER)
            self._prune()
        barrier()
        self.last_save = time.monotonic()
        return path

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        keep = {p.name for p in done[-self.keep_last:]}
        newest = done[-1].name if done else ""
        for p in self.root.iterdir():
            base = p.name.removesuffix("_universal")
            if not _TAG.match(base) or base in keep:
                continue
            if (p / MARKER).is_file() or base < newest:  # old complete ones, and stale incomplete ones
                shutil.rmtree(p, ignore_errors=True)

