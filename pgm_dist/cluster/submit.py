"""The login-node half of ``launcher/submit.py``: its options, the checks that run before anything
is submitted, and the submitit executor (SLURM, or the LocalExecutor for ``--local``).
The in-job half is :mod:`pgm_dist.cluster.job`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import complete_checkpoints, read_state
from pgm_dist.cluster.job import JobTask, entries, slurm_seconds
from pgm_dist.common.cli import run_cli
from pgm_dist.common.files import no_group_or_world_write

# Set in the batch script for every task: Python tracebacks of every thread on a fatal signal,
# NCCL warnings, and NCCL errors raised in the rank instead of hanging it (keeps a user's value).
JOB_ENVIRONMENT = {"PYTHONFAULTHANDLER": "1", "NCCL_DEBUG": "${NCCL_DEBUG:-WARN}",
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING": "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
                   # each rank's torch threads: its own CPUs, not the whole node's (a user's value wins)
                   "OMP_NUM_THREADS": "${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"}


class LaunchError(ValueError):
    """A launcher option that cannot work; the message says what to do."""


@dataclass(frozen=True)
class NodeRange:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def parse_nodes(text: str) -> NodeRange:
    """``N`` or ``MIN-MAX`` (SLURM starts the job on any count in the range)."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: give a node count N or a range MIN-MAX, e.g. 4-8")
    low, high = int(match[1]), int(match[2] or match[1])
    if low < 1:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: a job needs at least one node")
    if high < low:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: the range is empty (MIN must be <= MAX, e.g. 2-5)")
    return NodeRange(low, high)


def parse_minutes(text: str) -> int:
    """``--time`` in whole minutes (SLURM's resolution; seconds round up)."""
    try:
        seconds = slurm_seconds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--time: {err}") from None
    if not seconds:
        raise argparse.ArgumentTypeError(f"--time {text!r}: give a finite, positive limit")
    return math.ceil(seconds / 60)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python launcher/submit.py", allow_abbrev=False,
        usage="%(prog)s --nodes N|MIN-MAX [options] [-- training options]",
        description="Submit an elastic, preemptible multi-node training job to SLURM with submitit "
                    "(or run the same job as local processes with --local). Everything after -- goes to "
                    "the training entry point unchanged.")
    add = parser.add_argument
    add("--nodes", type=parse_nodes, default=NodeRange(1, 1), help="node count N or range MIN-MAX (default: 1)")
    add("--gpus-per-node", type=int, default=8, help="GPUs per node, one task per GPU; 0 for CPU nodes (default: 8)")
    add("--tasks-per-node", type=int, default=None, help="tasks (ranks) per node (default: --gpus-per-node, or 1)")
    add("--cpus-per-task", type=int, default=None,
        help="CPU cores per task (data loader workers + 1 or more), also passed to srun")
    add("--mem-gb", type=float, default=None, help="memory per node in GiB (default: all of it on GPU nodes)")
    add("--exclusive", action=argparse.BooleanOptionalAction, default=None,
        help="whole nodes, shared with no other job (default: on for GPU nodes, off for CPU nodes)")
    add("--partition", help="SLURM partition")
    add("--account", help="SLURM account")
    add("--qos", help="SLURM quality of service")
    add("--constraint", help="SLURM node feature constraint")
    add("--time", type=parse_minutes, default=parse_minutes("04:00:00"),
        help="time limit per (re)start: minutes, HH:MM:SS or D-HH:MM:SS (default: 04:00:00)")
    add("--signal-delay", type=int, default=120,
        help="seconds of warning (SIGUSR2) before the time limit; must cover one step plus one checkpoint "
             "save (default: 120)")
    add("--max-requeues", type=int, default=3,
        help="requeues after a time-out (preemptions requeue without limit; default: 3)")
    add("--name", default="pgm", help="job name (default: pgm)")
    add("--job-dir", type=Path, default=None,
        help="submitit logs (JOB_DIR/logs) and the training output (JOB_DIR/train) (default: runs/NAME)")
    add("--entry", default="train", choices=tuple(entries()),
        help="what the job runs: train (pgm_dist/train.py's options after --) or distill (pgm_dist/distill.py's) "
             "(default: train)")
    add("--env", action="append", default=[], metavar="KEY=VALUE",
        help="export KEY=VALUE in the batch script, for every task (repeatable)")
    add("--setup", action="append", default=[], metavar="CMD",
        help="a shell line the batch script runs before the tasks start, e.g. 'module load cuda' (repeatable)")
    add("--continue", dest="continue_run", action="store_true",
        help="JOB_DIR/train holds checkpoints: continue that run in this new job (without it, refused)")
    add("--dry-run", action="store_true", help="print the sbatch script and the training options; submit nothing")
    add("--local", action="store_true",
        help="run the job as processes on this machine (submitit's LocalExecutor) and wait for it")
    return parser


def breaks_line(text: str) -> bool:
    """A value that would end its line of the batch script (and run the rest as shell commands)."""
    return any(c in text for c in "\n\r\0")


def option_problems(args: argparse.Namespace) -> list[str]:
    """Every launcher option that cannot work, as one message each (parse_args reports them together)."""
    problems = []
    if args.tasks_per_node < 1 or args.gpus_per_node < 0:
        problems.append("--tasks-per-node must be >= 1 and --gpus-per-node >= 0")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        problems.append(f"one task per GPU: --tasks-per-node {args.tasks_per_node} must equal --gpus-per-node "
                        f"{args.gpus_per_node} (use --gpus-per-node 0 for CPU nodes)")
    if args.signal_delay < 1 or args.max_requeues < 0:
        problems.append("--signal-delay must be >= 1 second and --max-requeues >= 0")
    if args.signal_delay >= args.time * 60:
        problems.append(f"--signal-delay {args.signal_delay} s leaves no time to train within --time "
                        f"{args.time} min")
    if args.mem_gb is not None and args.mem_gb <= 0:
        problems.append(f"--mem-gb must be > 0 GiB, got {args.mem_gb}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        problems.append(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
    for option, value in (("--name", args.name), ("--partition", args.partition), ("--account", args.account),
                          ("--qos", args.qos), ("--constraint", args.constraint), ("--job-dir", str(args.job_dir))):
        if value is not None and breaks_line(value):
            problems.append(f"{option} {value!r} holds a line break or NUL, which would end its #SBATCH line "
                            "and run the rest as shell commands")
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            problems.append(f"--env {item!r}: give KEY=VALUE with KEY a shell variable name")
        elif breaks_line(value):
            problems.append(f"--env {key}: the value holds a line break or NUL")
    for line in args.setup:
        if breaks_line(line):
            problems.append(f"--setup {line!r}: one shell line per --setup (no line break or NUL)")
    return problems


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options, and the training options after ``--``."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    args.train_argv = argv[split + 1:]
    args.job_dir = args.job_dir or Path("runs") / args.name
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1
    problems = option_problems(args)
    if args.exclusive is None:
        args.exclusive = bool(args.gpus_per_node)
    if args.local and args.nodes != NodeRange(1, 1):
        problems.append("--local runs on this one machine: use --nodes 1 (and --tasks-per-node for more ranks)")
    if problems:
        parser.error("; ".join(problems))
    return args, args.train_argv


def world_sizes(args: argparse.Namespace) -> list[int]:
    return [n * args.tasks_per_node for n in range(args.nodes.low, args.nodes.high + 1)]


def job_argv(args: argparse.Namespace, cfg) -> tuple[str, ...]:
    """The training options every (re)start runs with: the user's, in the job's output folder, resuming."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # the entry's own (train: runs/default)
    if cfg.out != defaults["out"] or cfg.resume != "auto":
        raise LaunchError("the launcher sets --out to JOB_DIR/train and always resumes from there "
                          "(--resume auto): choose the folder with --job-dir, and a new one for a fresh run")
    return ("--no-progress", *JOB_CHECKPOINTS, *absolute_paths(args.train_argv),
            "--out", str((args.job_dir / "train").absolute()), "--resume", "auto")


# A job checkpoints by time, not by steps (the user's own --ckpt-every / --ckpt-minutes come later and
# win): what a crash or a node failure loses is bounded in minutes whatever the step time.
JOB_CHECKPOINTS = ("--ckpt-every", "0", "--ckpt-minutes", "10")


PATH_OPTIONS = ("--ds_config", "--data", "--teacher", "--train-shards")


def absolute(value: str) -> str:
    """A local path made absolute; a URL or a ``pipe:`` source as it is."""
    return value if "://" in value or value.startswith("pipe:") else str(Path(value).absolute())


def absolute_paths(argv: list[str]) -> list[str]:
    """``argv`` with the values of :data:`PATH_OPTIONS` that name local paths made absolute, so that a
    job started in another folder (or requeued after a ``cd``) reads the same files; URLs and
    ``pipe:`` sources stay as they are."""
    out, pending = [], False
    for item in argv:
        flag, eq, value = item.partition("=")
        if pending:
            item, pending = absolute(item), False
        elif item in PATH_OPTIONS:
            pending = True
        elif eq and flag in PATH_OPTIONS:
            item = f"{flag}={absolute(value)}"
        out.append(item)
    return out


def check_device(args: argparse.Namespace) -> torch.device:
    """The device the job's ranks will train on (what the DeepSpeed config is resolved for)."""
    return torch.device("cuda" if args.gpus_per_node else "cpu")


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's SlurmExecutor parameters (one sbatch line each)."""
    params = {"job_name": args.name, "time": args.time, "nodes": args.nodes.low,
              "ntasks_per_node": args.tasks_per_node, "signal_delay_s": args.signal_delay,
              # --requeue: SLURM may requeue the job itself (node failure, preemption with PreemptMode=REQUEUE)
              "additional_parameters": {"requeue": True},
              # A rank that dies ends the step at once, instead of leaving the others in a collective
              # until the process-group timeout.
              "srun_args": ["--kill-on-bad-exit=1"],
              "setup": [f"export {key}={value}" for key, value in JOB_ENVIRONMENT.items()] + [
                  f"export {key}={shlex.quote(value)}" for key, _, value in (i.partition("=") for i in args.env)
              ] + list(args.setup)}
    if args.exclusive:
        params["additional_parameters"]["exclusive"] = True
    if args.nodes.high != args.nodes.low:
        # With --ntasks-per-node in the header SLURM counts the tasks from MIN and grants MIN nodes; without
        # it, it grants as many whole nodes of the range as are free, and srun starts the tasks on each.
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


def logs_folder(args: argparse.Namespace) -> Path:
    return (args.job_dir / "logs").absolute()


def sbatch_script(args: argparse.Namespace) -> str:
    """The script ``sbatch`` gets (what submitit writes for the same parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(logs_folder(args)))}"
    return _make_sbatch_string(command=command, folder=logs_folder(args), **slurm_parameters(args))


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


# What a run cannot change and continue: the checkpoint holds another model, or was trained on other data.
FIXED_ON_CONTINUE = ("model", "data", "train_shards")


def check_job_folder(args: argparse.Namespace, cfg) -> list[str]:
    """A job folder whose run already holds checkpoints is refused unless ``--continue``; with it, the
    lines naming each training option that differs from the saved run's (raises LaunchError for
    those in :data:`FIXED_ON_CONTINUE`)."""
    checkpoints = complete_checkpoints(Path(cfg.out) / "checkpoints")
    if not checkpoints:
        return []
    latest = checkpoints[-1]
    if not args.continue_run:
        raise LaunchError(f"{cfg.out} already holds the checkpoints of a run (latest: {latest.name}): pass "
                          "--continue to go on with it in this job, or choose another --job-dir for a new run")
    saved, new = read_state(latest).get("train_config", {}), cfg.to_dict()
    for values in (saved, new):  # the same folder, whether given relative or absolute
        for key in ("ds_config", "data", "teacher", "train_shards"):
            if values.get(key):
                values[key] = absolute(values[key])
    changed = {key: (saved.get(key), new.get(key)) for key in sorted(set(saved) | set(new))
               if key not in ("out", "resume", "progress") and saved.get(key) != new.get(key)}
    fixed = {key: change for key, change in changed.items() if key in FIXED_ON_CONTINUE}
    if fixed:
        raise LaunchError(f"--continue: {latest} was trained with "
                          + ", ".join(f"{key}={old!r}" for key, (old, _) in fixed.items())
                          + "; a run cannot continue with "
                          + ", ".join(f"{key}={value!r}" for key, (_, value) in fixed.items())
                          + ": use the same values, or another --job-dir for a new run")
    return [f"--continue: {key} {old!r} -> {value!r}" for key, (old, value) in changed.items()]


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


def check_and_submit(args, train_argv: list[str]) -> None:
    """Everything :func:`main` checks before submitting, then the submission (nothing with --dry-run)."""
    entry = entries()[args.entry]
    task = JobTask(args.entry, job_argv(args, entry.parse(train_argv)), args.signal_delay)
    budget = cpu_budget(args)
    if args.dry_run:
        print(sbatch_script(args))
        print(budget)
        print("# training options of every (re)start:\n#   " + " ".join(task.argv))
    cfg = entry.parse(list(task.argv))
    for line in check_job_folder(args, cfg):
        print(line)
    entry.check(cfg, world_sizes(args), check_device(args))
    if args.dry_run:
        return
    job = submit(args, task)
    print(followup(args, job))
    if args.local:
        job.wait()
        statuses = job.results()
        print(f"job {job.job_id}: {statuses[0]}")
