"""One live job per run folder: ``OUT/lease.json`` names the job that trains into the folder.

Rank 0 takes the lease when a run starts, before it chooses its checkpoint. A requeue of the same
SLURM job (same job id) takes it back; another job is refused while its owner lives, and takes
it over once the owner is gone (ended, cancelled, crashed). The owner is the SLURM job id inside
a SLURM job, else the host and process id of rank 0. A finished run releases its lease; a stopped
or crashed one leaves it, and the next run finds its owner dead. ``launcher/submit.py`` checks
the lease before it submits.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from pgm_dist.common.errors import UserError

LEASE_FILE = "lease.json"
# squeue states of a job that has not ended (it may still train into the folder)
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
               "CONFIGURING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class RunFolderBusy(UserError):
    """Another live job holds the run folder's lease."""


def this_owner() -> dict:
    """Who this process trains for: its SLURM job (valid across requeues), else its host and pid."""
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):
        owner["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return owner


def describe(owner: dict) -> str:
    if owner.get("slurm_job"):
        return f"SLURM job {owner['slurm_job']}"
    return f"process {owner.get('pid')} on {owner.get('host')}"


def same_owner(a: dict, b: dict) -> bool:
    if a.get("slurm_job") or b.get("slurm_job"):
        return a.get("slurm_job") == b.get("slurm_job")
    return (a.get("host"), a.get("pid")) == (b.get("host"), b.get("pid"))


def slurm_job_state(job_id: str, timeout_s: float = 20) -> str | None:
    """The job's squeue state, "" when SLURM no longer knows the job, None when squeue cannot tell."""
    command = ["squeue", "-h", "-j", job_id, "-o", "%T"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode == 0:
        return out.stdout.strip().split("\n")[0].strip()
    return "" if "invalid job id" in out.stderr.lower() else None


def is_alive(owner: dict) -> bool | None:
    """True/False; None when this machine cannot tell (no squeue, or a process on another host)."""
    if owner.get("slurm_job"):
        state = slurm_job_state(owner["slurm_job"])
        return None if state is None else state in LIVE_STATES
    if owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (KeyError, TypeError, ValueError, OSError):
        return False
    return True


def read_lease(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / LEASE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: nobody's (a torn write of a crashed run)


def holder(out: Path, owner: dict | None = None) -> tuple[dict, bool | None] | None:
    """``(lease, alive)`` when another job that may still live holds ``out`` (else None), ``alive``
    as :func:`is_alive` read it (asked once: squeue is a call to the controller)."""
    lease = read_lease(out)
    if not lease or (owner is not None and same_owner(lease, owner)):
        return None
    alive = is_alive(lease)
    return None if alive is False else (lease, alive)


def busy_message(out: Path, lease: dict, alive: bool | None) -> str:
    state = "is still running" if alive else "may still be running (this machine cannot tell)"
    return (f"{out} is the run folder of {describe(lease)}, which {state}: two jobs would save, prune and "
            f"resume over each other. Wait for it or cancel it (scancel), or choose another folder; if it "
            f"has ended, delete {Path(out) / LEASE_FILE}")


def check_lease(out: Path, owner: dict | None = None) -> None:
    """Raise :class:`RunFolderBusy` when another live job (not ``owner``) holds ``out``."""
    busy = holder(out, owner)
    if busy is not None:
        raise RunFolderBusy(busy_message(out, *busy))


def take_lease(out: Path, owner: dict | None = None) -> dict:
    """Rank 0: hold ``out`` for ``owner`` (default :func:`this_owner`); raises :class:`RunFolderBusy`
    when another live job holds it. Two jobs taking a free folder at once: one wins the link."""
    owner = owner or this_owner()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LEASE_FILE
    record = {**owner, "since": time.time()}
    for _ in range(3):
        check_lease(out, owner)
        tmp = out / f".{LEASE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(record))
        try:
            if path.exists():  # ours (a requeue) or a dead owner's: replace it
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if another job created it meanwhile
                tmp.unlink()
        except FileExistsError:
            tmp.unlink()
            continue
        if same_owner(read_lease(out) or {}, owner):
            return record
    lease = read_lease(out) or {}
    raise RunFolderBusy(busy_message(out, lease, is_alive(lease)))


def release_lease(out: Path, owner: dict | None = None) -> None:
    """Rank 0 at the end of a finished run: the folder is free (only if this owner still holds it)."""
    owner = owner or this_owner()
    if same_owner(read_lease(out) or {}, owner):
        (Path(out) / LEASE_FILE).unlink(missing_ok=True)
