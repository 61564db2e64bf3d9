"""Small file helpers: atomic JSON writes and checksums."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def no_group_or_world_write() -> None:
    """Files and folders this process creates (run folders, checkpoints, job folders) get no group or
    world write permission, whatever the shell's umask: a checkpoint holds pickles, so whoever can
    write into a run folder can run code in the next process that resumes from it."""
    os.umask(os.umask(0o022) | 0o022)
