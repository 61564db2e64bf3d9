"""Submit a multi-node training job to SLURM with submitit: elastic, preemptible, self-resuming.

    python launcher/submit.py --nodes 8 [options] [-- training options]
    python launcher/submit.py --nodes 4-8 --time 24:00:00 -- --model pgm-6-6-d1024 --data /shared/owt
    python launcher/submit.py --local --gpus-per-node 0 --tasks-per-node 2 -- --max-steps 50
    python launcher/submit.py --nodes 2 --entry distill -- --teacher runs/default

Every task of the job runs the training entry point (``--entry distill``: distillation's)
in-process (one task per GPU, no ``deepspeed`` launcher), with the same options, in
JOB_DIR/train, with ``--resume auto``.
The job saves and requeues itself on preemption (SIGUSR2) and before its time limit;
``pgm_dist/slurm_job.py`` explains how. Every error a user can cause is reported here,
before anything is submitted.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgm_dist.common.cli import run_cli
from pgm_dist.slurm_job import JobTask, entries
from pgm_dist.slurm_submit import check_device, followup, job_argv, parse_args, sbatch_script, submit, world_sizes


def main(argv: list[str]) -> int:
    args, train_argv = parse_args(argv)
    return run_cli(lambda: check_and_submit(args, train_argv))


def check_and_submit(args, train_argv: list[str]) -> None:
    """Everything :func:`main` checks before submitting, then the submission (nothing with --dry-run)."""
    entry = entries()[args.entry]
    task = JobTask(args.entry, job_argv(args, entry.parse(train_argv)), args.signal_delay)
    if args.dry_run:
        print(sbatch_script(args))
        print("# training options of every (re)start:\n#   " + " ".join(task.argv))
    entry.check(entry.parse(list(task.argv)), world_sizes(args), check_device(args))
    if args.dry_run:
        return
    job = submit(args, task)
    print(followup(args, job))
    if args.local:
        job.wait()
        statuses = job.results()
        print(f"job {job.job_id}: {statuses[0]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
