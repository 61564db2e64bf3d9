"""What ``launcher/submit.py`` checks before it submits, beyond the options themselves: the SLURM
version for node lists, the job folder's run (``--continue``), where the job folder and Python
live, and the disk room for the checkpoints kept."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import complete_checkpoints, read_state
from pgm_dist.checkpoints.saver import checkpoint_bytes
from pgm_dist.cluster.options import LaunchError, absolute
from pgm_dist.models import build_model, count_parameters

# The first SLURM release whose -N/--nodes takes a list of node counts.
NODE_LIST_SLURM = (23, 2)


def slurm_version(timeout_s: float = 20) -> tuple[int, int] | None:
    """(major, minor) of ``sbatch --version`` ("slurm 22.05.8" -> (22, 5)); None when unknown."""
    try:
        out = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def check_node_list(args: argparse.Namespace) -> None:
    """A list of node counts needs SLURM 23.02 or newer: a LaunchError that says what to use instead."""
    if not args.nodes.sizes:
        return
    version = slurm_version()
    if version is None or version < NODE_LIST_SLURM:
        found = "an unknown SLURM version" if version is None else f"SLURM {version[0]}.{version[1]:02d}"
        raise LaunchError(f"--nodes {args.nodes}: a list of node counts needs SLURM 23.02 or newer, and sbatch "
                          f"here is {found}; give a range instead, e.g. --nodes {args.nodes.low}-{args.nodes.high} "
                          "(the global batch must then divide by every world size in the range)")


# What a run cannot change and continue: the checkpoint holds another model, or was trained on other data.
FIXED_ON_CONTINUE = ("model", "data", "train_shards")


def check_job_folder(args: argparse.Namespace, cfg) -> list[str]:
    """A job folder whose run already holds checkpoints is refused unless ``--continue``; with it, the
    lines naming each training option that differs from the saved run's (raises LaunchError for
    those in :data:`FIXED_ON_CONTINUE`)."""
    checkpoints = complete_checkpoints(Path(cfg.out) / "checkpoints")
    if not checkpoints:
        return []
    latest = checkpoints[-1]
    if not args.continue_run:
        raise LaunchError(f"{cfg.out} already holds the checkpoints of a run (latest: {latest.name}): pass "
                          "--continue to go on with it in this job, or choose another --job-dir for a new run")
    saved, new = read_state(latest).get("train_config", {}), cfg.to_dict()
    for values in (saved, new):  # the same folder, whether given relative or absolute
        for key in ("ds_config", "data", "teacher", "train_shards"):
            if values.get(key):
                values[key] = absolute(values[key])
    changed = {key: (saved.get(key), new.get(key)) for key in sorted(set(saved) | set(new))
               if key not in ("out", "resume", "progress") and saved.get(key) != new.get(key)}
    fixed = {key: change for key, change in changed.items() if key in FIXED_ON_CONTINUE}
    if fixed:
        raise LaunchError(f"--continue: {latest} was trained with "
                          + ", ".join(f"{key}={old!r}" for key, (old, _) in fixed.items())
                          + "; a run cannot continue with "
                          + ", ".join(f"{key}={value!r}" for key, (_, value) in fixed.items())
                          + ": use the same values, or another --job-dir for a new run")
    return [f"--continue: {key} {old!r} -> {value!r}" for key, (old, value) in changed.items()]


# What one checkpoint takes per model parameter, when the folder holds none yet to measure: the weights
# (2-4 bytes), fp32 master weights and Adam's two moments (12), the EMA (4).
CHECKPOINT_BYTES_PER_PARAMETER = 20


# Folders that are never shared between nodes, nor kept across a requeue on another node.
TEMPORARY_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm")


# File systems local to one machine (a network file system is what a multi-node job needs).
LOCAL_FILE_SYSTEMS = {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "overlay", "vfat"}


def file_system_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system ``path`` is on (the longest mount point above it, from /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    target = str(path)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_temporary(path: Path, kind: str | None) -> bool:
    return kind in ("tmpfs", "ramfs") or any(path == Path(t) or Path(t) in path.parents for t in TEMPORARY_FOLDERS)


def storage_problems(args: argparse.Namespace, mounts: str | None = None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) about where a SLURM job keeps its folder and finds its Python: the job runs
    on other machines than the login node, and a requeue may land on another node."""
    if args.local:
        return [], []
    refusals, warnings = [], []
    job_dir = args.job_dir.absolute().resolve()
    kind = file_system_type(job_dir, mounts)
    if is_temporary(job_dir, kind):
        refusals.append(f"--job-dir {job_dir} is on a temporary file system ({kind or 'tmp'}): the other nodes "
                        "do not see it and it may be wiped; put the job folder on a shared file system")
    elif kind in LOCAL_FILE_SYSTEMS:
        warnings.append(f"warning: --job-dir {job_dir} is on a {kind} file system, usually local to this machine: "
                        "every node of the job (and of a requeue) must see the same folder")
    prefix = Path(sys.prefix).resolve()
    kind = file_system_type(prefix, mounts)
    if is_temporary(prefix, kind) or kind in LOCAL_FILE_SYSTEMS:
        warnings.append(f"warning: the Python environment {prefix} is on a {kind or 'temporary'} file system: the "
                        "job's nodes must find the same environment at the same path")
    return refusals, warnings


def checkpoint_room(args: argparse.Namespace, cfg, model_config) -> str | None:
    """Why the job folder's disk cannot hold the checkpoints the run keeps (``--keep-last`` and the one
    being written); None when it can, or nothing is known yet. A checkpoint already in the folder is
    measured; else the size is estimated from the model's parameters."""
    measured = checkpoint_bytes(Path(cfg.out) / "checkpoints")
    if measured is None:
        if model_config is None:
            return None
        with torch.device("meta"):
            parameters = count_parameters(build_model(model_config))
        measured = CHECKPOINT_BYTES_PER_PARAMETER * parameters
    existing = next(p for p in [args.job_dir.absolute(), *args.job_dir.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    needed = (cfg.keep_last + 1) * measured
    if free >= needed:
        return None
    return (f"the job folder's disk has {free / 2**30:.2f} GiB free; the run keeps {cfg.keep_last} checkpoints "
            f"(--keep-last) and writes one more, about {measured / 2**30:.2f} GiB each: free space, lower --keep-last "
            "or choose another --job-dir")
