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
from pgm_dist.checkpoints.saver import checkpoint_bytes
from pgm_dist.cluster import retry
from pgm_dist.cluster.job import END_FILE_VARIABLE, JobTask, entries, slurm_seconds
from pgm_dist.common.cli import run_cli
from pgm_dist.common.files import no_group_or_world_write
from pgm_dist.models import build_model, count_parameters
from pgm_dist.training.lease import check_lease

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


# The first SLURM release whose -N/--nodes takes a list of node counts.
NODE_LIST_SLURM = (23, 2)


def slurm_version(timeout_s: float = 20) -> tuple[int, int] | None:
    """(major, minor) of ``sbatch --version`` ("slurm 22.05.8" -> (22, 5)); None when unknown."""
    try:
        out = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def check_node_list(args: argparse.Namespace) -> None:
    """A list of node counts needs SLURM 23.02 or newer: a LaunchError that says what to use instead."""
    if not args.nodes.sizes:
        return
    version = slurm_version()
    if version is None or version < NODE_LIST_SLURM:
        found = "an unknown SLURM version" if version is None else f"SLURM {version[0]}.{version[1]:02d}"
        raise LaunchError(f"--nodes {args.nodes}: a list of node counts needs SLURM 23.02 or newer, and sbatch "
                          f"here is {found}; give a range instead, e.g. --nodes {args.nodes.low}-{args.nodes.high} "
                          "(the global batch must then divide by every world size in the range)")


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


# What one checkpoint takes per model parameter, when the folder holds none yet to measure: the weights
# (2-4 bytes), fp32 master weights and Adam's two moments (12), the EMA (4).
CHECKPOINT_BYTES_PER_PARAMETER = 20
# Folders that are never shared between nodes, nor kept across a requeue on another node.
TEMPORARY_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm")
# File systems local to one machine (a network file system is what a multi-node job needs).
LOCAL_FILE_SYSTEMS = {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "overlay", "vfat"}


def file_system_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system ``path`` is on (the longest mount point above it, from /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    target = str(path)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_temporary(path: Path, kind: str | None) -> bool:
    return kind in ("tmpfs", "ramfs") or any(path == Path(t) or Path(t) in path.parents for t in TEMPORARY_FOLDERS)


def storage_problems(args: argparse.Namespace, mounts: str | None = None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) about where a SLURM job keeps its folder and finds its Python: the job runs
    on other machines than the login node, and a requeue may land on another node."""
    if args.local:
        return [], []
    refusals, warnings = [], []
    job_dir = args.job_dir.absolute().resolve()
    kind = file_system_type(job_dir, mounts)
    if is_temporary(job_dir, kind):
        refusals.append(f"--job-dir {job_dir} is on a temporary file system ({kind or 'tmp'}): the other nodes "
                        "do not see it and it may be wiped; put the job folder on a shared file system")
    elif kind in LOCAL_FILE_SYSTEMS:
        warnings.append(f"warning: --job-dir {job_dir} is on a {kind} file system, usually local to this machine: "
                        "every node of the job (and of a requeue) must see the same folder")
    prefix = Path(sys.prefix).resolve()
    kind = file_system_type(prefix, mounts)
    if is_temporary(prefix, kind) or kind in LOCAL_FILE_SYSTEMS:
        warnings.append(f"warning: the Python environment {prefix} is on a {kind or 'temporary'} file system: the "
                        "job's nodes must find the same environment at the same path")
    return refusals, warnings


def checkpoint_room(args: argparse.Namespace, cfg, model_config) -> str | None:
    """Why the job folder's disk cannot hold the checkpoints the run keeps (``--keep-last`` and the one
    being written); None when it can, or nothing is known yet. A checkpoint already in the folder is
    measured; else the size is estimated from the model's parameters."""
    measured = checkpoint_bytes(Path(cfg.out) / "checkpoints")
    if measured is None:
        if model_config is None:
            return None
        with torch.device("meta"):
            parameters = count_parameters(build_model(model_config))
        measured = CHECKPOINT_BYTES_PER_PARAMETER * parameters
    existing = next(p for p in [args.job_dir.absolute(), *args.job_dir.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    needed = (cfg.keep_last + 1) * measured
    if free >= needed:
        return None
    return (f"the job folder's disk has {free / 2**30:.2f} GiB free; the run keeps {cfg.keep_last} checkpoints "
            f"(--keep-last) and writes one more, about {measured / 2**30:.2f} GiB each: free space, lower --keep-last "
            "or choose another --job-dir")


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
