"""The retry of a crashed SLURM job: the decision (pgm_dist.cluster.retry.decide), and the batch
script's own lines (launcher's batch_lines) run by bash with a stand-in for srun's exit and a
recording scontrol, so the shell mechanics (EXIT trap, SIGTERM mark, end file) are the real ones."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pgm_dist.cluster.batch import batch_lines
from pgm_dist.cluster.options import parse_args
from pgm_dist.cluster.retry import decide, preempted


@pytest.mark.parametrize("rc, end, signalled, retries, retry", [
    (137, None, False, 0, True),  # a rank killed: the step ended, rank 0 recorded nothing
    (1, None, False, 1, True),  # a traceback, one retry used of two
    (137, None, False, 2, False),  # retries used up
    (143, None, True, 0, False),  # scancel / preemption / time limit: SLURM's business
    (0, "stopped", True, 0, False),
    (0, "finished", False, 0, False),
    (255, "preempted", False, 0, False),  # rank 0 requeued after its save (submitit exits 255)
    (2, "user_error", False, 0, False),
    (2, None, False, 0, False),  # argparse's exit before anything was recorded
    (137, "finished", False, 0, False),  # finished, another rank died at exit: not trained again
    (0, None, False, 0, False),
])
def test_which_exits_are_retried(rc, end, signalled, retries, retry):
    decision, why = decide(rc, end, signalled, retries, 2)
    assert decision is retry and why


def test_the_reasons_name_what_happened():
    assert "retry 1 of 2 (--max-retries)" in decide(137, None, False, 0, 2)[1]
    assert "a user error (exit status 2) is never retried" in decide(2, "user_error", False, 0, 2)[1]
    assert "all 2 retries (--max-retries) are used up" in decide(1, None, False, 2, 2)[1]


@pytest.fixture
def job(tmp_path):
    """A job folder, a recording scontrol on PATH, and a runner for the batch script's lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    args, _ = parse_args(["--gpus-per-node", "0", "--max-retries", "2", "--job-dir", str(tmp_path / "job")])
    (tmp_path / "job" / "logs").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}

    def script(tasks: str, restart: int = 0) -> subprocess.Popen:
        """bash running the lines before srun, then ``tasks`` in place of srun."""
        text = "\n".join([*batch_lines(args), tasks]) + "\n"
        return subprocess.Popen(["bash", "-c", text], env={**env, "SLURM_RESTART_COUNT": str(restart)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def requeues() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return script, requeues, tmp_path / "job" / "logs"


def test_a_crashed_step_is_requeued_until_the_retries_are_used_up(job):
    script, requeues, logs = job
    for restart in range(3):
        proc = script("sh -c 'exit 137'", restart)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 137  # the job's own exit status is kept
    assert requeues() == ["requeue 4242", "requeue 4242"]
    assert (logs / "4242_retries").read_text() == "2\n"
    assert "retry 1 of 2" not in out and "are used up: not requeued" in out


def test_rank_zeros_end_file_and_a_user_error_stop_the_retry(job):
    script, requeues, logs = job
    # rank 0 writes how the run ended to $PGM_END_FILE (the path the batch script chose for this restart)
    proc = script('echo finished > "$PGM_END_FILE"; exit 1')
    assert "the run finished" in proc.communicate(timeout=60)[0]
    assert (logs / "4242_0_end").read_text() == "finished\n"
    proc = script("exit 2", restart=1)
    assert "never retried" in proc.communicate(timeout=60)[0]
    proc = script("exit 1", restart=2)  # an end file of an earlier restart does not count
    proc.communicate(timeout=60)
    assert requeues() == ["requeue 4242"]


def test_an_end_file_left_by_the_same_restart_is_removed_first(job):
    script, requeues, logs = job
    (logs / "4242_0_end").write_text("finished\n")  # stale: a crash right after it must still retry
    proc = script("exit 1")
    proc.communicate(timeout=60)
    assert requeues() == ["requeue 4242"]


def test_a_job_slurm_stopped_is_never_retried(job):
    """scancel / preemption: SIGTERM reaches the batch script too; its tasks may die unsaved."""
    script, requeues, _ = job
    proc = script("sleep 3; exit 143")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "SLURM stopped the job" in out
    assert requeues() == []


def test_a_refused_requeue_says_what_to_run_instead(job, tmp_path):
    script, _, _ = job
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\n"
                                               "exit 1\n")
    out, _ = script("exit 1").communicate(timeout=60)
    assert "scontrol requeue 4242 was refused (Requested operation is presently disabled)" in out
    assert "submit the same command again with --continue" in out


@pytest.mark.parametrize("output, rc, restart, answer", [
    ("JobId=7 JobState=RUNNING PreemptEligibleTime=2026-12-07T05:29:05 PreemptTime=None Restarts=0", 0, None, False),
    ("JobId=7 JobState=RUNNING PreemptEligibleTime=2026-12-07T05:29:05 PreemptTime=2026-12-07T05:29:07 Restarts=0",
     0, None, True),
    ("JobId=7 JobState=RUNNING PreemptTime=2026-12-07T05:29:07 Restarts=2", 0, "2", True),
    # the grace time ended before the save: SLURM requeued the job itself, once is enough
    ("JobId=7 JobState=COMPLETING PreemptTime=2026-12-07T05:29:07 Restarts=1", 0, None, False),
    ("JobId=7 JobState=PENDING PreemptTime=2026-12-07T05:29:07 Restarts=1", 0, None, False),
    ("JobId=7 JobState=RUNNING PreemptTime=2026-12-07T05:29:07 Restarts=1", 0, "0", False),
    ("slurm_load_jobs error: Unable to contact slurm controller", 1, None, False),  # reported, read as "no"
])
def test_a_preemption_is_read_from_scontrols_preempt_time(tmp_path, monkeypatch, capsys, output, rc, restart,
                                                          answer):
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho '{output}'\nexit {rc}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if restart is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    assert preempted("7") is answer
    if "PreemptTime=2" in output and not answer:
        assert "SLURM has requeued it already" in capsys.readouterr().out
    if rc:
        assert "cannot tell whether the scheduler preempted the job" in capsys.readouterr().err
