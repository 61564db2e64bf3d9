"""What a SLURM job of ``launcher/submit.py`` does after its tasks exit: retry a crashed job.

The batch script runs ``python -m pgm_dist.cluster.retry`` from its EXIT trap, after ``srun``
returns. A rank that dies (a crash, an out-of-memory kill, a lost node) ends the step at once
(``srun --kill-on-bad-exit=1``); the job is then requeued, up to ``--max-retries`` times, and
resumes from its latest complete checkpoint. Never retried: a run that finished or stopped, a
job SLURM signalled (``scancel``, a preemption, the time limit; a preempted job is requeued by
SLURM itself), a job rank 0 already requeued after a time-limit warning, and a user error (exit 2:
the same options would fail the same way). The count is kept in ``LOGS/JOBID_retries`` beside
submitit's files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# The batch script names, per job and restart, the file where rank 0 writes how the run ended
# (:func:`pgm_dist.cluster.job.record_end`); the retry decision after the tasks exit reads it.
END_FILE_VARIABLE = "PGM_END_FILE"


def decide(rc: int, end: str | None, signalled: bool, retries: int, max_retries: int) -> tuple[bool, str]:
    """(requeue?, why) for tasks that exited with ``rc``; ``end``: what rank 0 recorded (None: nothing,
    it died), ``signalled``: the batch script got SIGTERM, ``retries``: retries already used."""
    if end in ("finished", "stopped"):
        return False, f"the run {end}"
    if end == "preempted":
        return False, "rank 0 requeued the job after its save (time-limit warning or USR2)"
    if signalled:
        return False, ("SLURM stopped the job (scancel, a preemption or the time limit): not retried; a "
                       "preempted job is requeued by SLURM itself")
    if end == "user_error" or rc == 2:
        return False, "a user error (exit status 2) is never retried: fix the options and submit again"
    if rc == 0:
        return False, "the tasks exited with status 0"
    if retries >= max_retries:
        return False, (f"the tasks failed (exit status {rc}) and all {max_retries} retries (--max-retries) "
                       "are used up: not requeued")
    return True, (f"the tasks failed (exit status {rc}): retry {retries + 1} of {max_retries} (--max-retries); "
                  "the job resumes from its latest complete checkpoint")


def read_count(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.cluster.retry",
                                     description="The batch script's retry decision after its tasks exit.")
    parser.add_argument("--logs", type=Path, required=True, help="the job's submitit folder (JOB_DIR/logs)")
    parser.add_argument("--rc", type=int, required=True, help="srun's exit status")
    parser.add_argument("--max-retries", type=int, required=True)
    parser.add_argument("--signalled", action="store_true", help="the batch script got SIGTERM")
    args = parser.parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID", "")
    end_file = os.environ.get("PGM_END_FILE")
    end = None
    if end_file and Path(end_file).is_file():
        end = Path(end_file).read_text().strip() or None
    counter = args.logs / f"{job}_retries"
    retries = read_count(counter)
    retry, why = decide(args.rc, end, args.signalled, retries, args.max_retries)
    print(f"job {job}: tasks exited with status {args.rc}; {why}", flush=True)
    if not retry or not job:
        return 0
    counter.write_text(f"{retries + 1}\n")
    requeue(job)
    return 0


def requeue(job: str, timeout_s: float = 60) -> bool:
    """``scontrol requeue JOB``; a refusal (or a hanging or missing scontrol) is printed with what to
    run instead, never raised: the checkpoint is already saved."""
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        failure = done.stderr.strip() if done.returncode else ""
    except (OSError, subprocess.SubprocessError) as err:
        failure = f"{type(err).__name__}: {err}"
    if failure:
        print(f"job {job}: {' '.join(command)} was refused ({failure}); to go on, submit the same command "
              "again with --continue: it resumes from the latest complete checkpoint", file=sys.stderr, flush=True)
    return not failure


def preempted(job: str, timeout_s: float = 20) -> bool:
    """Whether the scheduler preempted this run of ``job`` and has not requeued it yet: ``scontrol show
    job`` has PreemptTime set, the job is still RUNNING and its Restarts count is this run's
    (``SLURM_RESTART_COUNT``). A job that saves and exits within the preemption's GraceTime ends
    COMPLETED unless someone requeues it: SLURM itself requeues only a job still running when the
    grace time ends, and a job it requeued that way must not be requeued a second time. A failing or
    hanging scontrol is reported and read as "not preempted"."""
    command = ["scontrol", "show", "job", "-o", job]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        print(f"job {job}: {' '.join(command)} failed ({type(err).__name__}: {err}): cannot tell whether the "
              "scheduler preempted the job, so it is not requeued; if it was, submit again with --continue",
              file=sys.stderr, flush=True)
        return False
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    if fields.get("PreemptTime", "None") in ("None", "Unknown", ""):
        return False
    state, restarts = fields.get("JobState"), fields.get("Restarts", "0")
    if state != "RUNNING" or restarts != os.environ.get("SLURM_RESTART_COUNT", "0"):
        print(f"job {job} was preempted and SLURM has requeued it already (JobState {state}, Restarts "
              f"{restarts}): not requeued again", flush=True)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
