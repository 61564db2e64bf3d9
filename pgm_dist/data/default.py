"""The built-in corpus a run trains on without ``--data``: built once into ``DEFAULT_DATA``."""
from __future__ import annotations

import fcntl
from pathlib import Path

from pgm_dist.common.distributed import DistEnv
from pgm_dist.data.builder import BuildSettings, build

DEFAULT_DATA = Path("data_shards/default")


def default_data(env: DistEnv, out: Path = DEFAULT_DATA, inputs: list[Path] | None = None,
                 settings: BuildSettings | None = None) -> Path:
    """Build the built-in corpus (or ``inputs``) into ``out`` once: every rank of every node that
    starts without ``--data`` calls this at the same moment, so they take turns on a file lock
    beside ``out``; the first builds, the others find the finished folder and reuse it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build(out, inputs, settings or BuildSettings(), progress=env.is_main,
              log=print if env.is_main else (lambda *_: None))
    return out
