"""What runs inside a job of ``launcher/submit.py``: one task per rank, on SLURM or submitit's
LocalExecutor. submitit pickles a :class:`JobTask`; every task unpickles it and calls it.
On preemption or before the time limit every rank saves first, then rank 0 requeues
(:class:`RequeueAfterSave`); ``docs/cluster.md`` explains why and how.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission

from pgm_dist.cluster.options import ENTRY_NAMES, slurm_seconds
from pgm_dist.cluster.retry import END_FILE_VARIABLE, preempted, requeue
from pgm_dist.common.errors import USER_ERRORS, UserError
from pgm_dist.common.files import no_group_or_world_write
from pgm_dist.data.shards import DataFolder
from pgm_dist.distillation.config import parse_distill_config
from pgm_dist.distillation.task import prepare_distillation
from pgm_dist.distillation.teacher import check_teacher_data, find_teacher
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.config import parse_train_config
from pgm_dist.training.loop import StopFlag
from pgm_dist.training.session import run
from pgm_dist.training.setup import check_before_launch, prepare_process, preset_for_data

SLURM_EARLY_WARNING_S = 60


@dataclass(frozen=True)
class Entry:
    """One entry point the launcher can run (``--entry``): training or distillation."""
    parse: Callable  # argv -> config (argparse errors exit with status 2)
    check: Callable  # (config, world sizes the job may get, device) -> None; raises USER_ERRORS
    prepare: Callable  # config -> Setup of this process (raises USER_ERRORS)
    run: Callable  # Setup -> "finished" | "preempted" | "stopped"
    model_config: Callable  # config -> the ModelConfig it trains, None when not known before the job


def entries() -> dict[str, Entry]:
    """``--entry`` name -> Entry: ``train`` (``pgm_dist/train.py``), ``distill`` (``pgm_dist/distill.py``)."""

    def check_distillation(cfg, world_sizes: list[int], device) -> None:
        # the rest of the teacher's checks need its data, read in the job
        check_teacher_data(find_teacher(cfg.teacher), cfg.data)
        check_before_launch(cfg, world_sizes, device)

    def trained_model(cfg) -> ModelConfig | None:
        return preset_for_data(cfg, DataFolder.open(Path(cfg.data))) if cfg.data else None

    def student(cfg) -> ModelConfig:
        return ModelConfig.from_dict(find_teacher(cfg.teacher).info["model_config"])

    return dict(zip(ENTRY_NAMES, (
        Entry(parse_train_config, check_before_launch, prepare_process, run, trained_model),
        Entry(parse_distill_config, check_distillation, lambda cfg: prepare_process(cfg, prepare_distillation),
              run, student))))


def seconds_left(started: float, timeout_s: float = 20) -> float | None:
    """Seconds until the scheduler stops this job (None: no limit or not known). A ``squeue`` that
    is missing, fails or hangs is reported on stderr and read as "not known": this runs after a
    good save, where a traceback would turn a requeue into a failed job."""
    if "SLURM_JOB_ID" in os.environ:
        command = ["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%L"]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True)
            return slurm_seconds(out.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            print(f"{' '.join(command)} gave no time left ({type(err).__name__}: {err}); "
                  "taking the signal as a preemption", file=sys.stderr, flush=True)
            return None
    if "SUBMITIT_LOCAL_TIMEOUT_S" in os.environ:  # the LocalExecutor's limit counts from the tasks' start
        return float(os.environ["SUBMITIT_LOCAL_TIMEOUT_S"]) - (time.time() - started)
    return None


class RequeueAfterSave(SignalHandler):
    """submitit's requeue (time-out countdown, ``checkpoint()``, new job pickle, requeue, exit), run
    after the loop saved instead of from the signal; the time left decides time-out vs preemption."""

    def __init__(self, started: float, signal_delay_s: int):
        env = submitit.JobEnvironment()
        super().__init__(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
        self._start_time, self.signal_delay_s = started, signal_delay_s
        if env.cluster == "slurm":
            # submitit's own `scontrol requeue` raises on a refusal: a traceback after a good save. This
            # one prints the refusal and what to run instead; the job then exits as submitit's would.
            env._requeue = lambda countdown: requeue(env.job_id)

    def has_timed_out(self) -> bool:
        left = seconds_left(self._start_time)
        timed_out = left is not None and left <= self.signal_delay_s + SLURM_EARLY_WARNING_S
        self._logger.info(f"{left} s left in the allocation: {'time-out' if timed_out else 'preemption'}")
        return timed_out


def launch_info(signal_delay_s: int) -> dict:
    env = submitit.JobEnvironment()
    return {"job_id": env.job_id, "nodes": ",".join(env.hostnames), "num_nodes": env.num_nodes,
            "signal_delay_s": signal_delay_s}


def record_end(status: str) -> None:
    """Rank 0: how this (re)start ended ("finished", "preempted", "stopped", "user_error"), for the
    batch script's retry decision. No file (a crash, a killed rank) means the job failed."""
    path = os.environ.get(END_FILE_VARIABLE)
    if path and int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0:
        try:
            Path(path).write_text(status + "\n")
        except OSError as err:
            print(f"could not record how the job ended in {path}: {err}", file=sys.stderr, flush=True)


def user_error(err: Exception) -> NoReturn:
    """Exit 2 with the message: never retried, the same options would fail the same way."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    record_end("user_error")
    sys.exit(2)


@dataclass(frozen=True)
class JobTask:
    """The callable submitit pickles: ``entry`` with ``argv`` (which name the output folder and
    ``--resume auto``), on every task of the job."""
    entry: str
    argv: tuple[str, ...]
    signal_delay_s: int

    def __call__(self) -> str:
        started = time.time()
        # Before anything slow: a stop signal during start-up is kept for the loop (which then requeues
        # or stops without training) instead of reaching submitit's handlers.
        StopFlag.installed()
        no_group_or_world_write()
        # The job's own ranks win over torch variables the submitting shell may have exported.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        entry = entries()[self.entry]
        try:
            setup = entry.prepare(entry.parse(list(self.argv)))
        except USER_ERRORS as err:
            user_error(err)
        setup.launch = launch_info(self.signal_delay_s)
        try:
            status = entry.run(setup)
        except UserError as err:  # rank 0 refused the start: another live job holds the run folder
            user_error(err)
        record_end(status)
        if status == "preempted":  # SIGUSR2, saved on every rank: now requeue (rank 0; the others return)
            RequeueAfterSave(started, self.signal_delay_s).checkpoint_and_try_requeue(signal.SIGUSR2)
            return status
        # Finished, or stopped by SIGTERM: a plain `scancel` (never requeued: SLURM would requeue a
        # cancelled job that asked for --requeue) or a scheduler preemption. A time-limit warning now
        # means nothing: Python resets the handlers it installed (the loop's) to the default action,
        # terminate, while it shuts down, so a warning arriving then turned a completed job into a
        # FAILED one; an ignored signal stays ignored.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        job = os.environ.get("SLURM_JOB_ID")
        if status == "stopped" and job and submitit.JobEnvironment().global_rank == 0 and preempted(job):
            # PreemptMode=REQUEUE requeues a job still running when its GraceTime ends; this one saved
            # and exits within it, which SLURM would take as COMPLETED. Requeued once, here, and only
            # for a preemption (never counted as a time-out).
            print(f"job {job} was preempted by the scheduler: saved, requeueing it", flush=True)
            requeue(job)
        return status

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit on rank 0 to requeue: the same task, which resumes from the latest
        complete checkpoint. It saves nothing (the loop already did, on every rank)."""
        return DelayedSubmission(JobTask(self.entry, self.argv, self.signal_delay_s))
