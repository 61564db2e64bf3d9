"""Resuming at another world size or ZeRO stage through DeepSpeed's universal checkpoints."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import UNIVERSAL_MARKER
from pgm_dist.common.distributed import DistEnv, barrier


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

