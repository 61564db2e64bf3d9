"""One checkpoint format for training, distillation and sampling.

A checkpoint is a folder ``<root>/step_XXXXXXXX/`` holding DeepSpeed's shards (with
the client state: train state, every rank's data-loader state, objective state,
``universal_checkpoint_info``) plus our own files written by rank 0:

- ``pgm_state.json``: step, world size, ZeRO stage, configs, tokenizer checksum
  (readable without DeepSpeed; the decisions taken before ``deepspeed.initialize``
  come from it);
- ``ema.safetensors``: the EMA weights; ``tokenizer.model``: the tokenizer;
- the objective's weight files, if it has any (distillation's ``teacher.safetensors``);
- ``COMPLETE``: written atomically after a barrier that follows every rank's save.

Only folders with ``COMPLETE`` are ever resumed from, so a kill at any moment of a
save leaves the previous checkpoint as the one to resume."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from pgm_dist.common.errors import ConfigError

MARKER = "COMPLETE"


UNIVERSAL_MARKER = "UNIVERSAL_COMPLETE"


STATE_FILE = "pgm_state.json"


EMA_FILE = "ema.safetensors"




_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume_checkpoint(resume: str, root: Path) -> Path | None:
    """``never`` -> None (``root`` must hold no complete checkpoint); ``auto`` -> the latest
    complete checkpoint under ``root`` (or None); a path -> that checkpoint, or the latest
    complete one below it."""
    if resume == "never":
        if complete_checkpoints(root):
            # Pruning keeps the highest steps: the earlier run's checkpoints would survive and this
            # run's be deleted, and a later --resume auto would continue the earlier run.
            raise ConfigError(f"--resume never, but {root} holds checkpoints of an earlier run; "
                              "pass another --out, or delete them to start over")
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    done = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
    if not done:
        raise ConfigError(f"--resume {resume}: not a complete checkpoint and holds none "
                          f"(a checkpoint folder has a {MARKER} file)")
    return done[-1]


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / EMA_FILE))

