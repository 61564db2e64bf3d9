"""The no-``--data`` default build: ranks that start at once build the folder exactly once."""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time

import numpy as np

from pgm_dist.data.shards import DataFolder
from tests.helpers.training import REPO

# Each process: a rank-0 view (so that both log) of default_data on a tiny corpus.
_CALL = """
import sys
from pathlib import Path
from pgm_dist.data.builder import BuildSettings
from pgm_dist.common.distributed import DistEnv
from pgm_dist.data.default import default_data
settings = BuildSettings(vocab_size=300, seq_len=64, samples_per_shard=16, val_fraction=0.05, workers=1)
print("ready", flush=True)
default_data(DistEnv(0, 0, 1), Path(sys.argv[1]), [Path(sys.argv[2])], settings)
"""


def _corpus(path):
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(200)] + ["the", "of", "and"]
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, size=150))}) for _ in range(200)))
    return path


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_concurrent_default_builds_build_once_and_equal_a_single_build(tmp_path):
    docs = _corpus(tmp_path / "docs.jsonl")
    out = tmp_path / "shards" / "default"
    out.parent.mkdir()
    # Hold the lock until both processes are about to build, so that they contend for it.
    with open(out.parent / ".default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", _CALL, str(out), str(docs)], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        time.sleep(1.0)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # Without the lock both would build (neither would find a finished folder to reuse).
    assert sum("reusing it" in log for log in logs) == 1, logs
    assert (tmp_path / "shards" / ".default.lock").is_file()
    folder = DataFolder.open(out)
    assert folder.meta.train.shards > 1

    single = tmp_path / "single" / "default"
    done = subprocess.run([sys.executable, "-c", _CALL, str(single), str(docs)], cwd=REPO, text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stderr
    assert _shard_bytes(out) == _shard_bytes(single) and _shard_bytes(out)
