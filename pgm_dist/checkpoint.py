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
save leaves the previous checkpoint as the one to resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pgm_dist.common.distributed import DistEnv, barrier
from pgm_dist.common.errors import ConfigError
from pgm_dist.common.files import write_json_atomic

MARKER = "COMPLETE"
UNIVERSAL_MARKER = "UNIVERSAL_COMPLETE"
STATE_FILE = "pgm_state.json"
EMA_FILE = "ema.safetensors"
TOKENIZER_FILE = "tokenizer.model"
FAULT_ENV = "PGM_DIST_FAULT_KILL_IN_SAVE"  # "STEP:RANK": that rank kills itself mid-save (tests)
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


def prepare_universal(checkpoint: Path, env: DistEnv, log=print) -> str:
    """Convert ``checkpoint`` to DeepSpeed's universal format once (rank 0, others wait);
    returns the tag to load. Needed when the world size or ZeRO stage changes."""
    target = checkpoint.with_name(checkpoint.name + "_universal")
    if env.is_main and not (target / UNIVERSAL_MARKER).is_file():
        log(f"converting {checkpoint} to a universal checkpoint for the new parallel layout ...")
        shutil.rmtree(target, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
             "--output_folder", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        _loadable_by_every_stage(target)
        (target / UNIVERSAL_MARKER).write_text("")
    barrier()
    return target.name


def _loadable_by_every_stage(universal: Path) -> None:
    """Complete a universal checkpoint so that DeepSpeed 0.19.8 loads it under ZeRO-1/2 and ZeRO-3
    alike, whichever family wrote the source; each loader's missing piece comes from what the
    other family's conversion holds (the weights and Adam's moments, in ``zero/<param>/``, are
    the same for both):

    - the model-states file: the conversion keeps the source's name (ZeRO-3: one per rank,
      ``zero_pp_rank_R_mp_rank_00_model_states.pt``; else ``mp_rank_00_model_states.pt``), the
      loader looks for its own stage's (rank 0's under ZeRO-3). A universal load reads only
      metadata and the client state from it, so rank 0's file serves under either name;
    - Adam's step count: ZeRO-1/2 read it from ``zero/<param>/step.pt``, ZeRO-3 from
      ``zero/optimizer_state.pt``'s ``optimizer_state_dict`` (with the parameter groups), and
      ZeRO-1/2 require a ``ds_version`` there;
    - the per-parameter states (``fp32``, ``exp_avg``, ``exp_avg_sq``): ZeRO-3's conversion writes
      flat tensors, ZeRO-1/2 read ``{"param": tensor of the parameter's shape}`` (ZeRO-3 reads both);
      the shapes are the model-states file's ``param_shapes``.
    """
    import deepspeed

    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    present = [universal / name for name in names if (universal / name).is_file()]
    if not present:
        raise RuntimeError(f"universal checkpoint {universal} holds no model-states file ({' or '.join(names)})")
    for name in names:
        if not (universal / name).exists():
            try:
                os.link(present[0], universal / name)
            except OSError:  # a file system without hard links
                shutil.copyfile(present[0], universal / name)

    zero = universal / "zero"
    optimizer_file = zero / "optimizer_state.pt"
    optimizer = torch.load(optimizer_file, map_location="cpu", weights_only=False)
    param_dirs = [d for d in zero.iterdir() if d.is_dir()]
    if "optimizer_state_dict" in optimizer:  # written from ZeRO-3
        step = optimizer["optimizer_state_dict"]["state"][0]["step"]
    else:
        step = torch.load(param_dirs[0] / "step.pt", map_location="cpu", weights_only=False)
        optimizer["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optimizer["param_groups"]}
    optimizer.setdefault("ds_version", deepspeed.__version__)
    torch.save(optimizer, optimizer_file)
    shapes = {}
    for group in torch.load(present[0], map_location="cpu", weights_only=False)["param_shapes"]:
        shapes.update(group)
    for d in param_dirs:
        if not (d / "step.pt").exists():
            torch.save(step, d / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            state = torch.load(d / f"{key}.pt", map_location="cpu", weights_only=False)
            if torch.is_tensor(state):
                torch.save({"param": state.view(shapes[d.name]), "cat_dim": 0}, d / f"{key}.pt")


def _maybe_fault(step: int, rank: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


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
