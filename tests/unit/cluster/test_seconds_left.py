"""What the in-job task reads of the time left: SLURM's ``squeue`` (a real executable on PATH
here: a script answering as squeue would, one failing, one hanging, or none) or the LocalExecutor's limit."""
import os
import time

import pytest

from pgm_dist.cluster.job import seconds_left
from tests.helpers.executables import install


def _squeue(folder, body: str) -> None:
    install(folder, "squeue", body)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SUBMITIT_LOCAL_TIMEOUT_S", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # only the squeue a test writes
    return tmp_path


def test_squeue_time_left_is_read(slurm_job):
    _squeue(slurm_job, 'test "$*" = "-h -j 42 -o %L" && echo "1-02:03:04"')
    assert seconds_left(time.time()) == 93784


@pytest.mark.parametrize("body", ["exit 1", "echo INVALID", ""])
def test_a_failing_squeue_means_not_known(slurm_job, body, capsys):
    _squeue(slurm_job, body)
    assert seconds_left(time.time()) is None
    assert "taking the signal as a preemption" in capsys.readouterr().err


def test_a_missing_squeue_means_not_known(slurm_job, capsys):
    assert seconds_left(time.time()) is None
    assert "FileNotFoundError" in capsys.readouterr().err


def test_a_hanging_squeue_is_given_up(slurm_job, capsys):
    _squeue(slurm_job, "exec /bin/sleep 30")
    start = time.monotonic()
    assert seconds_left(time.time(), timeout_s=0.5) is None
    assert time.monotonic() - start < 10
    assert "TimeoutExpired" in capsys.readouterr().err


def test_the_local_executor_limit_counts_from_the_start(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_TIMEOUT_S", "600")
    assert seconds_left(time.time() - 100) == pytest.approx(500, abs=2)
    monkeypatch.delenv("SUBMITIT_LOCAL_TIMEOUT_S")
    assert seconds_left(time.time()) is None and "SLURM_JOB_ID" not in os.environ
