"""``launcher/submit.py``'s options: parsing and the checks on the options alone (node counts, time
limits, values written into the batch script), the world sizes a job may get, and the training
options every (re)start of the job runs with."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# The entry points a job can run (``--entry``), in the order of :func:`pgm_dist.cluster.job.entries`.
ENTRY_NAMES = ("train", "distill")


def slurm_seconds(text: str) -> int | None:
    """SLURM durations (``--time`` and ``squeue %L``) in seconds: ``M``, ``M:S``, ``H:M:S``,
    ``D-H``, ``D-H:M``, ``D-H:M:S``; None for UNLIMITED / NOT_SET. Raises ValueError otherwise."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET"):
        return None
    days, dash, clock = text.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3 or (dash and not days.isdigit()):
        raise ValueError(f"cannot read {text!r} as a SLURM time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    numbers = [int(p) for p in parts]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    h, m, s = {1: [0, numbers[0], 0], 2: [0, *numbers], 3: numbers}[len(numbers)]
    return (h * 60 + m) * 60 + s


class LaunchError(ValueError):
    """A launcher option that cannot work; the message says what to do."""


@dataclass(frozen=True)
class NodeRange:
    """``--nodes``: N, a range MIN-MAX, or (SLURM 23.02 and newer) a list of counts."""
    low: int
    high: int
    sizes: tuple[int, ...] | None = None  # a list: only these counts

    def __str__(self) -> str:
        if self.sizes:
            return ",".join(map(str, self.sizes))
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    @property
    def counts(self) -> list[int]:
        return list(self.sizes) if self.sizes else list(range(self.low, self.high + 1))

    @property
    def elastic(self) -> bool:
        return self.low != self.high


def parse_nodes(text: str) -> NodeRange:
    """``N``, ``MIN-MAX`` (SLURM starts the job on any count in the range) or ``N1,N2,...`` (only
    those counts; SLURM 23.02 and newer)."""
    if re.fullmatch(r"\s*\d+(\s*,\s*\d+)+\s*", text):
        sizes = tuple(sorted({int(part) for part in text.split(",")}))
        if sizes[0] < 1:
            raise argparse.ArgumentTypeError(f"--nodes {text!r}: a job needs at least one node")
        return NodeRange(sizes[0], sizes[-1], sizes if len(sizes) > 1 else None)
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: give a node count N, a range MIN-MAX (e.g. 4-8) or a "
                                         "list of counts (e.g. 4,8)")
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
    add("--nodes", type=parse_nodes, default=NodeRange(1, 1),
        help="node count N, range MIN-MAX, or list N1,N2 (SLURM 23.02+) (default: 1)")
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
    add("--max-retries", type=int, default=2,
        help="requeues after a crash (a rank that dies, a lost node); a user error (exit 2) is never retried "
             "(default: 2)")
    add("--name", default="pgm", help="job name (default: pgm)")
    add("--job-dir", type=Path, default=None,
        help="submitit logs (JOB_DIR/logs) and the training output (JOB_DIR/train) (default: runs/NAME)")
    add("--entry", default="train", choices=ENTRY_NAMES,
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
    if args.signal_delay < 1 or args.max_requeues < 0 or args.max_retries < 0:
        problems.append("--signal-delay must be >= 1 second, --max-requeues and --max-retries >= 0")
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
    return [n * args.tasks_per_node for n in args.nodes.counts]


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
