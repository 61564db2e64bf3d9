"""Process-group setup from the torch variables, whoever sets them.

RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the
``deepspeed`` launcher, torchrun, or a SLURM launcher that maps SLURM's variables
to them. A plain ``python pgm_dist/train.py`` runs as a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports free on this host now (all held open together while chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def dist_env() -> DistEnv:
    """Read (and for a lone process, fill in) the torch distributed variables."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def select_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_min: float = 10.0) -> None:
    """The process group (NCCL on GPUs, gloo on CPUs); a collective waits ``timeout_min`` minutes
    for a missing rank before it fails."""
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_min))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) that is a no-op in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable; ``obj`` of the other ranks is ignored)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shared_memory_buffers(addr: str | None = None, port: str | None = None) -> list[Path]:
    """The ``/dev/shm`` files of DeepSpeed's CPU all-reduce for this user at ``addr:port``
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 67 MB each): DeepSpeed never
    deletes them, so every CPU run would leave one per rank behind."""
    addr = addr or os.environ.get("MASTER_ADDR", "")
    port = port or os.environ.get("MASTER_PORT", "")
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"))


def release_shared_memory(env: DistEnv) -> None:
    """Collective, at the end of a run: unlink this rank's all-reduce buffer once every rank is
    past its last collective (the others' mappings stay valid until they exit)."""
    barrier()
    for path in shared_memory_buffers():
        if path.name.endswith(f"_{env.rank}"):
            path.unlink(missing_ok=True)
