"""The batch script a job of ``launcher/submit.py`` runs: submitit's SlurmExecutor parameters (one
``#SBATCH`` line each), the lines before ``srun`` (environment, the retry decision after the tasks),
and each rank's CPU budget."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from pgm_dist.cluster import retry
from pgm_dist.cluster.retry import END_FILE_VARIABLE

# Set in the batch script for every task: Python tracebacks of every thread on a fatal signal,
# NCCL warnings, and NCCL errors raised in the rank instead of hanging it (keeps a user's value).
JOB_ENVIRONMENT = {"PYTHONFAULTHANDLER": "1", "NCCL_DEBUG": "${NCCL_DEBUG:-WARN}",
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING": "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
                   # each rank's torch threads: its own CPUs, not the whole node's (a user's value wins)
                   "OMP_NUM_THREADS": "${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"}


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's SlurmExecutor parameters (one sbatch line each)."""
    params = {"job_name": args.name, "time": args.time, "nodes": args.nodes.low,
              "ntasks_per_node": args.tasks_per_node, "signal_delay_s": args.signal_delay,
              # --requeue: SLURM may requeue the job itself (node failure, preemption with PreemptMode=REQUEUE)
              "additional_parameters": {"requeue": True},
              # A rank that dies ends the step at once, instead of leaving the others in a collective
              # until the process-group timeout.
              "srun_args": ["--kill-on-bad-exit=1"],
              "setup": batch_lines(args)}
    if args.exclusive:
        params["additional_parameters"]["exclusive"] = True
    if args.nodes.elastic:
        # With --ntasks-per-node in the header SLURM counts the tasks from MIN and grants MIN nodes; without
        # it, it grants as many whole nodes of the range (or list) as are free, and srun starts the tasks on each.
        params["additional_parameters"].update(nodes=str(args.nodes), exclusive=True)
        params["srun_args"].append(f"--ntasks-per-node={params.pop('ntasks_per_node')}")
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem"] = f"{round(args.mem_gb * 1024)}M"
    elif args.gpus_per_node:
        params["mem"] = "0"  # SLURM: all the memory of each node
    if args.cpus_per_task is not None:  # srun no longer inherits it from sbatch (SLURM 22.05-23.02)
        params["srun_args"].append(f"--cpus-per-task={args.cpus_per_task}")
    for name in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return params


def batch_lines(args: argparse.Namespace) -> list[str]:
    """The batch script's lines before ``srun``: the job's environment, the retry decision after the
    tasks exit (:mod:`pgm_dist.cluster.retry`, run from an EXIT trap; SIGTERM to the batch script marks
    a job SLURM stopped, which is never retried), then the user's ``--env`` and ``--setup``."""
    logs = shlex.quote(str(logs_folder(args)))
    after_tasks = (f"pgm_after_tasks() {{ rc=$?; {shlex.quote(sys.executable)} {shlex.quote(retry.__file__)} "
                   f"--logs {logs} --rc \"$rc\" --max-retries {args.max_retries} ${{PGM_SIGNALLED:+--signalled}}; "
                   'exit "$rc"; }')
    return [*(f"export {key}={value}" for key, value in JOB_ENVIRONMENT.items()),
            f'export {END_FILE_VARIABLE}={logs}/"${{SLURM_JOB_ID}}_${{SLURM_RESTART_COUNT:-0}}_end"',
            f'rm -f "${END_FILE_VARIABLE}"',
            "trap 'PGM_SIGNALLED=1' TERM",
            after_tasks,
            "trap pgm_after_tasks EXIT",
            *(f"export {key}={shlex.quote(value)}" for key, _, value in (i.partition("=") for i in args.env)),
            *args.setup]


def logs_folder(args: argparse.Namespace) -> Path:
    return (args.job_dir / "logs").absolute()


def sbatch_script(args: argparse.Namespace) -> str:
    """The script ``sbatch`` gets (what submitit writes for the same parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(logs_folder(args)))}"
    return _make_sbatch_string(command=command, folder=logs_folder(args), **slurm_parameters(args))


def node_cpus(partition: str | None, timeout_s: float = 20) -> int | None:
    """The fewest CPUs a node of ``partition`` (default: every partition) has, as ``sinfo`` says;
    None when sinfo is missing, fails or does not answer."""
    command = ["sinfo", "-h", "-N", "-o", "%c", *(["-p", partition] if partition else [])]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
        counts = [int(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(counts) if counts else None


def cpu_budget(args: argparse.Namespace) -> str:
    """Each rank's CPUs, as a line for --dry-run; on GPU nodes without --cpus-per-task this also
    sets it: floor(node CPUs / tasks per node), from sinfo."""
    if args.cpus_per_task is None and args.gpus_per_node and not args.local:
        cpus = node_cpus(args.partition)
        if cpus is None:
            return ("# each rank: CPUs not known (sinfo gave none): pass --cpus-per-task, or each task gets "
                    "SLURM's default")
        args.cpus_per_task = max(1, cpus // args.tasks_per_node)
    if args.cpus_per_task is None:
        return "# each rank: SLURM's default CPUs (--cpus-per-task not given)"
    return (f"# each rank: {args.cpus_per_task} CPUs (OMP_NUM_THREADS={args.cpus_per_task}); room for "
            f"{max(0, args.cpus_per_task - 2)} DataLoader workers (--loader-workers) beside the rank and its "
            "pin-memory thread")
