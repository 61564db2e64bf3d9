"""What the launcher checks about storage before it submits: the job folder's file system (a
temporary one refused, a local one warned about), the disk room for the checkpoints kept, and the
run folder's lease (another live job trains there)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pgm_dist.checkpoints.format import MARKER
from pgm_dist.cluster.checks import CHECKPOINT_BYTES_PER_PARAMETER, checkpoint_room, file_system_type, storage_problems
from pgm_dist.cluster.options import parse_args
from pgm_dist.cluster.submit import main
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.lease import LEASE_FILE

MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
nfs-server:/export/home /home nfs4 rw 0 0
lustre@tcp:/scratch /scratch lustre rw 0 0
/dev/nvme0n1 /local ext4 rw 0 0
/dev/sda1 /tmp ext4 rw 0 0
"""


@pytest.mark.parametrize("path, kind", [
    ("/scratch/me/run", "lustre"), ("/home/me", "nfs4"), ("/local/x", "ext4"), ("/tmp/a", "ext4"),
    ("/dev/shm/b", "tmpfs"), ("/work", "overlay"), ("/scratchy", "overlay"),  # a prefix of a name is no mount
])
def test_the_file_system_is_the_longest_mount_above_the_path(path, kind):
    assert file_system_type(Path(path), MOUNTS) == kind


def _problems(job_dir: str, *extra: str) -> tuple[list[str], list[str]]:
    args, _ = parse_args(["--gpus-per-node", "0", "--job-dir", job_dir, *extra])
    return storage_problems(args, MOUNTS)


@pytest.mark.parametrize("job_dir", ["/tmp/run", "/var/tmp/run", "/dev/shm/run"])
def test_a_job_folder_on_a_temporary_file_system_is_refused(job_dir):
    refusals, _ = _problems(job_dir)
    assert refusals == [f"--job-dir {job_dir} is on a temporary file system "
                        f"({file_system_type(Path(job_dir), MOUNTS) or 'tmp'}): the other nodes do not see it and it "
                        "may be wiped; put the job folder on a shared file system"]


def test_a_shared_job_folder_passes_and_a_local_one_is_warned_about():
    refusals, warnings = _problems("/scratch/me/run")
    assert refusals == [] and not [w for w in warnings if "--job-dir" in w]
    refusals, warnings = _problems("/local/run")
    assert refusals == []
    assert any("--job-dir /local/run is on a ext4 file system, usually local" in w for w in warnings)


def test_local_jobs_may_use_any_folder():
    assert _problems("/tmp/run", "--local") == ([], [])


def _cfg(tmp_path: Path, keep_last: int = 3) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / "job" / "train"), keep_last=keep_last)


def test_checkpoint_room_is_estimated_from_the_parameters_before_the_first_checkpoint(tmp_path, monkeypatch):
    args, _ = parse_args(["--job-dir", str(tmp_path / "job")])
    config = ModelConfig.preset("pgm-tiny", vocab_size=400, seq_len=32)
    one = CHECKPOINT_BYTES_PER_PARAMETER * count_parameters(build_model(config))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4 * one))  # keep 3 + 1 being written
    assert checkpoint_room(args, _cfg(tmp_path), config) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4 * one - 1))
    message = checkpoint_room(args, _cfg(tmp_path), config)
    assert "the run keeps 3 checkpoints (--keep-last) and writes one more" in message
    assert f"about {one / 2**30:.2f} GiB each" in message
    assert checkpoint_room(args, _cfg(tmp_path), None) is None  # nothing known: no check


def test_checkpoint_room_measures_an_existing_checkpoint(tmp_path, monkeypatch):
    args, _ = parse_args(["--job-dir", str(tmp_path / "job")])
    checkpoint = tmp_path / "job" / "train" / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    with open(checkpoint / "a.pt", "wb") as f:
        f.truncate(10**6)
    (checkpoint / MARKER).write_text("10\n")
    size = 10**6 + 3
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * size - 1))
    assert "the run keeps 1 checkpoints" in checkpoint_room(args, _cfg(tmp_path, keep_last=1), None)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * size))
    assert checkpoint_room(args, _cfg(tmp_path, keep_last=1), None) is None


def test_a_folder_another_live_job_trains_into_is_refused_before_submitting(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        train = tmp_path / "job" / "train"
        train.mkdir(parents=True)
        (train / LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        code = main(["--local", "--gpus-per-node", "0", "--job-dir", str(tmp_path / "job"), "--dry-run"])
        assert code == 2
        assert f"error: {train} is the run folder of process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["--local", "--gpus-per-node", "0", "--job-dir", str(tmp_path / "job"), "--dry-run"]) == 0
    assert os.path.exists(train / LEASE_FILE)  # a dry run takes nothing
