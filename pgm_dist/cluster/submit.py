"""The login-node half of ``launcher/submit.py``: every check before anything is submitted (options in
:mod:`.options`, the job folder and storage in :mod:`.checks`), then the submitit executor (SLURM,
or the LocalExecutor for ``--local``) with the batch script of :mod:`.batch`. The in-job half is
:mod:`pgm_dist.cluster.job`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pgm_dist.cluster.batch import cpu_budget, logs_folder, sbatch_script, slurm_parameters
from pgm_dist.cluster.checks import check_job_folder, check_node_list, checkpoint_room, storage_problems
from pgm_dist.cluster.job import JobTask, entries
from pgm_dist.cluster.options import LaunchError, check_device, job_argv, parse_args, world_sizes
from pgm_dist.common.cli import run_cli
from pgm_dist.common.files import no_group_or_world_write
from pgm_dist.training.lease import check_lease


def make_executor(args: argparse.Namespace):
    import submitit

    if args.local:
        executor = submitit.LocalExecutor(logs_folder(args), max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.time, tasks_per_node=args.tasks_per_node,
                                   gpus_per_node=args.gpus_per_node, signal_delay_s=args.signal_delay)
        return executor
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("sbatch/srun not found: this is not a SLURM login node. Use --local to run the same "
                          "job as processes on this machine, or --dry-run to see the sbatch script")
    executor = submitit.SlurmExecutor(logs_folder(args), max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def submit(args: argparse.Namespace, task: JobTask):
    """Submit ``task``; ``sbatch`` refusing the job (a wrong partition, account or QOS, a limit) is a
    LaunchError carrying sbatch's own message, not a traceback."""
    from submitit.core.utils import FailedJobError

    executor = make_executor(args)
    try:
        return executor.submit(task)
    except FailedJobError as err:
        raise LaunchError(f"sbatch refused the job: {str(err).strip() or 'no message'}") from None


def followup(args: argparse.Namespace, job) -> str:
    """What to run next: logs, TensorBoard, follow, preempt, cancel."""
    out = args.job_dir / "train"
    lines = [f"submitted job {job.job_id}: {args.name}, {args.nodes} node(s) x {args.tasks_per_node} task(s)",
             f"logs:        {job.paths.stdout}  (.err beside it; one pair per task)",
             f"output:      {out}  (checkpoints, config.json)",
             f"TensorBoard: tensorboard --logdir {out / 'tb'}"]
    if args.local:
        lines.append(f"running here (controller pid {job.job_id}); waiting for it to finish")
    else:
        lines += [f"follow:      squeue -j {job.job_id}    tail -f {job.paths.stdout}",
                  f"preempt:     scancel --signal=USR2 {job.job_id}   (saves, requeues, resumes)",
                  f"cancel:      scancel {job.job_id}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    no_group_or_world_write()  # the job folder and its logs
    args, train_argv = parse_args(argv)
    return run_cli(lambda: check_and_submit(args, train_argv))


def check_and_submit(args, train_argv: list[str]) -> None:
    """Everything :func:`main` checks before submitting, then the submission (nothing with --dry-run)."""
    entry = entries()[args.entry]
    task = JobTask(args.entry, job_argv(args, entry.parse(train_argv)), args.signal_delay)
    budget = cpu_budget(args)
    if args.dry_run:
        print(sbatch_script(args))
        print(budget)
        if args.nodes.sizes:
            print(f"# --nodes {args.nodes}: a list of node counts needs SLURM 23.02 or newer")
        print("# training options of every (re)start:\n#   " + " ".join(task.argv))
    cfg = entry.parse(list(task.argv))
    check_lease(Path(cfg.out))  # another live job trains into this folder
    for line in check_job_folder(args, cfg):
        print(line)
    entry.check(cfg, world_sizes(args), check_device(args))
    refusals, warnings = storage_problems(args)
    if (short := checkpoint_room(args, cfg, entry.model_config(cfg))) is not None:
        refusals.append(short)
    for line in warnings:
        print(line, file=sys.stderr)
    if refusals:
        raise LaunchError("; ".join(refusals))
    if args.dry_run:
        return
    if not args.local:
        check_node_list(args)
    job = submit(args, task)
    print(followup(args, job))
    if args.local:
        job.wait()
        statuses = job.results()
        print(f"job {job.job_id}: {statuses[0]}")
