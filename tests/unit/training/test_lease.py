"""One live job per run folder: the lease in OUT/lease.json (pgm_dist.training.lease), and rank 0's
choice of checkpoint that every rank follows (training.session.agree_on_start)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pgm_dist.checkpoints.format import read_state
from pgm_dist.common.distributed import DistEnv
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.lease import (
    LEASE_FILE,
    RunFolderBusy,
    check_lease,
    is_alive,
    read_lease,
    release_lease,
    take_lease,
)
from pgm_dist.training.session import agree_on_start
from pgm_dist.training.setup import prepare
from tests.helpers.legacy import LEGACY

HOST = socket.gethostname()


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lease(out: Path, **owner) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE_FILE).write_text(json.dumps({**owner, "since": 0}))


def test_a_free_folder_is_taken_and_released_by_its_owner(tmp_path):
    owner = {"host": HOST, "pid": os.getpid()}
    take_lease(tmp_path, owner)
    assert {k: read_lease(tmp_path)[k] for k in ("host", "pid")} == owner
    check_lease(tmp_path, owner)  # its own lease is no obstacle
    release_lease(tmp_path, {"host": HOST, "pid": 1})  # someone else's release leaves it
    assert (tmp_path / LEASE_FILE).exists()
    release_lease(tmp_path, owner)
    assert not (tmp_path / LEASE_FILE).exists()


def test_another_live_process_keeps_the_folder(tmp_path, live_process):
    write_lease(tmp_path, host=HOST, pid=live_process.pid)
    with pytest.raises(RunFolderBusy) as err:
        take_lease(tmp_path, {"host": HOST, "pid": os.getpid()})
    assert f"is the run folder of process {live_process.pid} on {HOST}, which is still running" in str(err.value)
    assert f"delete {tmp_path / LEASE_FILE}" in str(err.value)
    assert read_lease(tmp_path)["pid"] == live_process.pid  # untouched


def test_a_dead_owners_lease_is_taken_over(tmp_path, dead_pid):
    write_lease(tmp_path, host=HOST, pid=dead_pid)
    assert is_alive(read_lease(tmp_path)) is False
    take_lease(tmp_path, {"host": HOST, "pid": os.getpid()})
    assert read_lease(tmp_path)["pid"] == os.getpid()


def test_a_process_on_another_host_cannot_be_checked_and_is_refused(tmp_path):
    write_lease(tmp_path, host="elsewhere-node-17", pid=1234)
    assert is_alive(read_lease(tmp_path)) is None
    with pytest.raises(RunFolderBusy, match="may still be running \\(this machine cannot tell\\)"):
        check_lease(tmp_path, {"host": HOST, "pid": os.getpid()})


def test_an_unreadable_lease_is_nobodys(tmp_path):
    (tmp_path / LEASE_FILE).write_text('{"slurm_job": "12')  # torn by a crash
    take_lease(tmp_path, {"host": HOST, "pid": os.getpid()})
    assert read_lease(tmp_path)["pid"] == os.getpid()


def fake_squeue(tmp_path: Path, monkeypatch, states: dict[str, str]) -> Path:
    """An ``squeue -h -j ID -o %T`` that knows ``states`` and calls every other job invalid; each call
    appends a line to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "squeue_calls"
    cases = "".join(f'  {job}) echo {state};;\n' for job, state in states.items())
    invalid = 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;;'
    (bin_dir / "squeue").write_text(f'#!/bin/sh\necho "$3" >> {calls}\ncase "$3" in\n{cases}  *) {invalid}\nesac\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_slurm_jobs_are_checked_with_squeue_and_a_requeue_keeps_its_lease(tmp_path, monkeypatch):
    calls = fake_squeue(tmp_path, monkeypatch, {"101": "RUNNING", "102": "PENDING", "103": "COMPLETED"})
    out = tmp_path / "run"
    write_lease(out, slurm_job="101", host="n1", pid=7)
    with pytest.raises(RunFolderBusy, match="is the run folder of SLURM job 101, which is still running"):
        take_lease(out, {"slurm_job": "102", "host": "n2", "pid": 8})
    assert calls.read_text().split() == ["101"]  # the controller asked once per refusal
    take_lease(out, {"slurm_job": "101", "host": "n5", "pid": 9})  # job 101 requeued on another node
    assert read_lease(out)["host"] == "n5"
    write_lease(out, slurm_job="103", host="n1", pid=7)  # ended: taken over
    take_lease(out, {"slurm_job": "102", "host": "n2", "pid": 8})
    write_lease(out, slurm_job="99", host="n1", pid=7)  # SLURM forgot it: taken over
    take_lease(out, {"slurm_job": "102", "host": "n2", "pid": 8})
    assert read_lease(out)["slurm_job"] == "102"


def test_without_squeue_a_slurm_lease_is_not_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue at all
    write_lease(tmp_path, slurm_job="101", host="n1", pid=7)
    with pytest.raises(RunFolderBusy, match="may still be running"):
        check_lease(tmp_path, {"slurm_job": "102"})


def _setup(out: Path):
    saved = read_state(LEGACY / "checkpoint" / "step_00000003")
    cfg = replace(TrainConfig(**saved["train_config"]), data=str(LEGACY / "data"), out=str(out), progress=False)
    return prepare(cfg, DistEnv(0, 0, 1), torch.device("cpu"), ModelConfig.from_dict(saved["model_config"]))


def test_every_rank_resumes_from_rank_zeros_listing_made_after_the_lease(tmp_path):
    """The checkpoint that completed after this rank prepared (resume_from None) is what rank 0
    finds once it holds the lease; the setup follows it (universal only across layouts)."""
    setup = _setup(tmp_path)
    assert setup.resume_from is None
    shutil.copytree(LEGACY / "checkpoint" / "step_00000003", tmp_path / "checkpoints" / "step_00000003")
    agreed = agree_on_start(setup)
    assert agreed.resume_from == tmp_path / "checkpoints" / "step_00000003"
    assert agreed.universal is False and "checkpoint" not in agreed.ds_config
    assert read_lease(tmp_path)["pid"] == os.getpid()
    shutil.rmtree(tmp_path / "checkpoints")  # gone again: back to a fresh start
    assert agree_on_start(agreed).resume_from is None


def test_a_run_refused_by_the_lease_raises_before_building_anything(tmp_path, live_process):
    setup = _setup(tmp_path)
    write_lease(tmp_path, host=HOST, pid=live_process.pid)
    with pytest.raises(RunFolderBusy, match="still running"):
        agree_on_start(setup)
