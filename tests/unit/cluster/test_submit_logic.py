"""The SLURM launcher's pure logic (``launcher/submit.py`` and its modules), without SLURM: time
formats, node ranges, world sizes, the options, the job's argv, the sbatch script, the follow-up
text and the checks that run before anything is submitted. ``tests/e2e/cluster/test_launcher.py`` runs the
same launcher on a real (throw-away) SLURM cluster.

Every expected value here is worked out by hand in the test, not taken from the code.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pgm_dist.cluster.checks as checks_module
from pgm_dist.cluster.batch import logs_folder, sbatch_script, slurm_parameters
from pgm_dist.cluster.checks import check_job_folder, check_node_list
from pgm_dist.cluster.job import SLURM_EARLY_WARNING_S, JobTask, entries, seconds_left, slurm_seconds
from pgm_dist.cluster.options import (
    LaunchError,
    NodeRange,
    absolute_paths,
    check_device,
    job_argv,
    parse_args,
    parse_minutes,
    parse_nodes,
    world_sizes,
)
from pgm_dist.cluster.submit import followup
from pgm_dist.common.errors import ConfigError
from pgm_dist.distillation.config import DistillConfig, parse_distill_config
from pgm_dist.training.config import TrainConfig, parse_train_config
from pgm_dist.training.session import run
from pgm_dist.training.setup import allowed_world_sizes, check_before_launch, prepare_process

# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def ds_config(tmp_path) -> Path:
    """A DeepSpeed config of our own (global batch 16, micro-batch 8), independent of ds_configs/."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
                                "gradient_clipping": 1.0, "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 2}}))
    return path


def sbatch_lines(script: str) -> set[str]:
    return {line for line in script.splitlines() if line.startswith("#SBATCH ")}


def srun_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


def launcher_error(argv: list[str], capsys) -> str:
    """parse_args(argv) must exit with argparse's status 2; returns what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# slurm_seconds: SLURM durations (--time and squeue %L)


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60),  # M: minutes
    ("0", 0),
    ("1:30", 1 * 60 + 30),  # M:S
    ("90:01", 90 * 60 + 1),
    ("1:30:00", 1 * 3600 + 30 * 60),  # H:M:S
    ("04:00:00", 4 * 3600),
    ("00:00:00", 0),
    ("1-2", (24 + 2) * 3600),  # D-H
    ("1-2:03", (24 + 2) * 3600 + 3 * 60),  # D-H:M
    ("1-2:03:04", (24 + 2) * 3600 + 3 * 60 + 4),  # D-H:M:S = 93784
    ("3-00:00:00", 3 * 86400),
    ("0-0:0:1", 1),
])
def test_slurm_seconds_reads_every_slurm_time_format(text, seconds):
    assert slurm_seconds(text) == seconds


def test_slurm_seconds_of_one_day_two_hours_three_minutes_four_seconds_is_93784():
    assert slurm_seconds("1-2:03:04") == 93784


def test_slurm_seconds_of_90_minutes_is_5400():
    assert slurm_seconds("90") == 5400


@pytest.mark.parametrize("text", [" 45 ", "45\n", "\t45 \n"])
def test_slurm_seconds_ignores_surrounding_whitespace_of_squeue_output(text):
    assert slurm_seconds(text) == 2700


@pytest.mark.parametrize("text", ["UNLIMITED", "INFINITE", "NOT_SET", "unlimited", "Infinite", " UNLIMITED\n"])
def test_slurm_seconds_of_an_unlimited_time_is_none(text):
    assert slurm_seconds(text) is None


@pytest.mark.parametrize("text", ["", "ten", "5m", "1.5", "1:2:3:4", "1-", "1:", ":30", "a-1:00", "1-2-3",
                                  "1-2:3:4:5", "1 30"])
def test_slurm_seconds_rejects_what_is_not_a_slurm_time(text):
    with pytest.raises(ValueError, match="as a SLURM time"):
        slurm_seconds(text)


def test_slurm_seconds_error_names_the_text_and_the_formats():
    with pytest.raises(ValueError) as err:
        slurm_seconds("ten")
    assert str(err.value) == "cannot read 'ten' as a SLURM time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)"


def test_slurm_seconds_rejects_a_negative_time():
    with pytest.raises(ValueError):
        slurm_seconds("-5")


# --------------------------------------------------------------------------------------------------
# parse_minutes: --time in whole minutes


@pytest.mark.parametrize("text, minutes", [
    ("90", 90),
    ("1:30:00", 90),
    ("04:00:00", 240),
    ("0:30", 1),  # 30 seconds round up to one minute
    ("90:01", 91),  # 90 min 1 s round up
    ("1:00:01", 61),
    ("1:00:00", 60),
    ("1-0", 24 * 60),
    ("2-12", 2 * 24 * 60 + 12 * 60),
])
def test_parse_minutes_rounds_seconds_up_to_whole_minutes(text, minutes):
    assert parse_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0", "00:00:00", "0-0", "UNLIMITED", "INFINITE"])
def test_parse_minutes_rejects_a_zero_or_unlimited_time(text):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse_minutes(text)
    assert str(err.value) == f"--time {text!r}: give a finite, positive limit"


def test_parse_minutes_reports_an_unreadable_time_as_a_time_option_error():
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse_minutes("ten")
    assert str(err.value) == ("--time: cannot read 'ten' as a SLURM time "
                              "(minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")


# --------------------------------------------------------------------------------------------------
# parse_nodes / NodeRange: --nodes N or MIN-MAX


@pytest.mark.parametrize("text, low, high", [
    ("4", 4, 4),
    ("2-8", 2, 8),
    ("3-3", 3, 3),
    (" 3 ", 3, 3),
    ("1-1", 1, 1),
    ("007", 7, 7),
    ("10-100", 10, 100),
])
def test_parse_nodes_reads_a_count_or_a_range(text, low, high):
    assert parse_nodes(text) == NodeRange(low, high)


@pytest.mark.parametrize("low, high, text", [(4, 4, "4"), (2, 8, "2-8"), (1, 1, "1"), (3, 30, "3-30")])
def test_node_range_prints_as_slurm_nodes_option(low, high, text):
    assert str(NodeRange(low, high)) == text


BAD_NODES = "give a node count N, a range MIN-MAX (e.g. 4-8) or a list of counts (e.g. 4,8)"


@pytest.mark.parametrize("text, message", [
    ("0", "--nodes '0': a job needs at least one node"),
    ("0,4", "--nodes '0,4': a job needs at least one node"),
    ("4,", "--nodes '4,': " + BAD_NODES),
    ("4,8-9", "--nodes '4,8-9': " + BAD_NODES),
    ("0-2", "--nodes '0-2': a job needs at least one node"),
    ("5-2", "--nodes '5-2': the range is empty (MIN must be <= MAX, e.g. 2-5)"),
    ("two", "--nodes 'two': " + BAD_NODES),
    ("-3", "--nodes '-3': " + BAD_NODES),
    ("2-", "--nodes '2-': " + BAD_NODES),
    ("2..4", "--nodes '2..4': " + BAD_NODES),
    ("", "--nodes '': " + BAD_NODES),
])
def test_parse_nodes_rejects_bad_node_counts_with_a_clear_message(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse_nodes(text)
    assert str(err.value) == message


@pytest.mark.parametrize("text, counts, printed", [
    ("4,8", [4, 8], "4,8"), ("8, 4", [4, 8], "4,8"), ("2,4,8", [2, 4, 8], "2,4,8"), ("4,4", [4], "4"),
])
def test_parse_nodes_reads_a_list_of_counts(text, counts, printed):
    nodes = parse_nodes(text)
    assert (nodes.counts, str(nodes), nodes.elastic) == (counts, printed, len(counts) > 1)


def test_a_node_list_gives_only_its_world_sizes_and_the_sbatch_nodes_line():
    args, _ = parse_args(["--nodes", "4,8", "--gpus-per-node", "8"])
    assert world_sizes(args) == [32, 64]  # not 40, 48, 56 (which a range 4-8 would allow)
    script = sbatch_script(args)
    assert "#SBATCH --nodes=4,8\n" in script and "--ntasks-per-node=8" in script.split("srun")[1]


@pytest.mark.parametrize("version, refused", [((22, 5), True), ((23, 2), False), ((24, 11), False), (None, True)])
def test_a_node_list_needs_slurm_23_02(monkeypatch, version, refused):
    monkeypatch.setattr(checks_module, "slurm_version", lambda: version)
    args, _ = parse_args(["--nodes", "4,8"])
    if not refused:
        check_node_list(args)
        return
    with pytest.raises(LaunchError) as err:
        check_node_list(args)
    assert "a list of node counts needs SLURM 23.02 or newer" in str(err.value)
    assert "--nodes 4-8" in str(err.value)  # what to use instead


def test_slurm_version_reads_sbatch_version(tmp_path, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\necho 'slurm 22.05.8'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert checks_module.slurm_version() == (22, 5)
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert checks_module.slurm_version() is None


# --------------------------------------------------------------------------------------------------
# parse_args: the launcher's options


def test_parse_args_defaults():
    args, train_argv = parse_args([])
    assert args.nodes == NodeRange(1, 1)
    assert (args.gpus_per_node, args.tasks_per_node) == (8, 8)
    assert args.time == 240  # 04:00:00
    assert (args.signal_delay, args.max_requeues) == (120, 3)
    assert (args.name, args.job_dir, args.entry) == ("pgm", Path("runs/pgm"), "train")
    assert (args.dry_run, args.local) == (False, False)
    assert (args.mem_gb, args.cpus_per_task, args.partition) == (None, None, None)
    assert train_argv == [] and args.train_argv == []


def test_parse_args_job_dir_defaults_to_runs_slash_name():
    args, _ = parse_args(["--name", "big-run"])
    assert args.job_dir == Path("runs") / "big-run"


def test_parse_args_keeps_an_explicit_job_dir(tmp_path):
    args, _ = parse_args(["--name", "big-run", "--job-dir", str(tmp_path / "jd")])
    assert args.job_dir == tmp_path / "jd"


@pytest.mark.parametrize("argv, tasks", [
    (["--gpus-per-node", "4"], 4),
    (["--gpus-per-node", "0"], 1),  # CPU nodes: one task unless told
    (["--gpus-per-node", "0", "--tasks-per-node", "3"], 3),
    (["--gpus-per-node", "2", "--tasks-per-node", "2"], 2),
])
def test_parse_args_tasks_per_node_default_to_one_per_gpu_or_one(argv, tasks):
    args, _ = parse_args(argv)
    assert args.tasks_per_node == tasks


def test_parse_args_passes_everything_after_double_dash_to_training():
    args, train_argv = parse_args(["--nodes", "2", "--", "--max-steps", "5", "--nodes", "3"])
    assert args.nodes == NodeRange(2, 2)  # the --nodes after -- is training's, not the launcher's
    assert train_argv == ["--max-steps", "5", "--nodes", "3"]


def test_parse_args_splits_at_the_first_double_dash_only():
    _, train_argv = parse_args(["--", "--data", "x", "--", "y"])
    assert train_argv == ["--data", "x", "--", "y"]


@pytest.mark.parametrize("argv, minutes", [
    (["--time", "90"], 90),
    (["--time", "1-2:03:04"], 1564),  # 93784 s = 1563.07 min, rounded up
    (["--time", "0:30", "--signal-delay", "59"], 1),
])
def test_parse_args_time_is_in_whole_minutes(argv, minutes):
    args, _ = parse_args(argv)
    assert args.time == minutes


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "argument --nodes: --nodes '0': a job needs at least one node"),
    (["--nodes", "5-2"], "the range is empty (MIN must be <= MAX, e.g. 2-5)"),
    (["--nodes", "two"], "give a node count N, a range MIN-MAX"),
    (["--time", "ten"], "argument --time: --time: cannot read 'ten' as a SLURM time"),
    (["--time", "0"], "--time '0': give a finite, positive limit"),
    (["--time", "UNLIMITED"], "--time 'UNLIMITED': give a finite, positive limit"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"],
     "one task per GPU: --tasks-per-node 2 must equal --gpus-per-node 4 (use --gpus-per-node 0 for CPU nodes)"),
    (["--gpus-per-node", "0", "--tasks-per-node", "0"], "--tasks-per-node must be >= 1 and --gpus-per-node >= 0"),
    (["--gpus-per-node", "-1"], "--tasks-per-node must be >= 1 and --gpus-per-node >= 0"),
    (["--signal-delay", "0"], "--signal-delay must be >= 1 second, --max-requeues and --max-retries >= 0"),
    (["--max-requeues", "-1"], "--signal-delay must be >= 1 second, --max-requeues and --max-retries >= 0"),
    (["--max-retries", "-1"], "--signal-delay must be >= 1 second, --max-requeues and --max-retries >= 0"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120 s leaves no time to train within --time 2 min"),
    (["--time", "0:30", "--signal-delay", "60"], "--signal-delay 60 s leaves no time to train within --time 1 min"),
    (["--local", "--nodes", "2"], "--local runs on this one machine: use --nodes 1"),
    (["--local", "--nodes", "1-2"], "--local runs on this one machine: use --nodes 1"),
    (["--entry", "eval"], "argument --entry: invalid choice: 'eval'"),
    (["--tim", "5"], "unrecognized arguments: --tim 5"),  # no abbreviations
    (["--gpus-per-node", "two"], "argument --gpus-per-node: invalid int value: 'two'"),
])
def test_parse_args_errors_exit_2_with_a_clear_message(argv, message, capsys):
    err = launcher_error(argv, capsys)
    assert message in err
    assert "python launcher/submit.py: error:" in err


def test_parse_args_reports_every_problem_at_once_joined_by_semicolons(capsys):
    err = launcher_error(["--gpus-per-node", "4", "--tasks-per-node", "2", "--signal-delay", "0"], capsys)
    assert ("one task per GPU: --tasks-per-node 2 must equal --gpus-per-node 4 (use --gpus-per-node 0 for CPU "
            "nodes); --signal-delay must be >= 1 second, --max-requeues and --max-retries >= 0") in err


def test_parse_args_accepts_a_signal_delay_just_under_the_time_limit():
    args, _ = parse_args(["--time", "2", "--signal-delay", "119"])
    assert (args.time, args.signal_delay) == (2, 119)


def test_parse_args_accepts_local_on_one_node_with_several_tasks():
    args, _ = parse_args(["--local", "--gpus-per-node", "0", "--tasks-per-node", "2"])
    assert args.local and args.nodes == NodeRange(1, 1) and args.tasks_per_node == 2


def test_parse_args_rejects_a_negative_time(capsys):
    launcher_error(["--time", "-5"], capsys)


def test_parse_args_rejects_a_negative_memory(capsys):
    launcher_error(["--mem-gb", "-1"], capsys)


def test_parse_args_rejects_zero_cpus_per_task(capsys):
    launcher_error(["--cpus-per-task", "0"], capsys)


# --------------------------------------------------------------------------------------------------
# world sizes: nodes x tasks per node, and the sizes a global batch allows


@pytest.mark.parametrize("argv, sizes", [
    (["--nodes", "2-4", "--gpus-per-node", "2"], [4, 6, 8]),
    (["--nodes", "3"], [24]),  # 8 GPUs per node by default
    (["--gpus-per-node", "0"], [1]),
    (["--nodes", "1-3", "--gpus-per-node", "0", "--tasks-per-node", "4"], [4, 8, 12]),
    (["--nodes", "2-8"], [16, 24, 32, 40, 48, 56, 64]),
    (["--nodes", "4-4", "--gpus-per-node", "1"], [4]),
])
def test_world_sizes_are_every_node_count_of_the_range_times_tasks_per_node(argv, sizes):
    args, _ = parse_args(argv)
    assert world_sizes(args) == sizes


@pytest.mark.parametrize("global_batch, micro_batch, sizes", [
    (16, 8, [1, 2]),
    (8, 4, [1, 2]),
    (12, 2, [1, 2, 3, 6]),  # 12 / 2 = 6 micro-batches per step: W divides 6
    (48, 2, [1, 2, 3, 4, 6, 8, 12, 24]),
    (512, 8, [1, 2, 4, 8, 16, 32, 64]),
    (7, 1, [1, 7]),
    (8, 8, [1]),
    (8, 16, []),  # micro-batch larger than the global batch: nothing works
    (10, 4, []),  # 10 is no multiple of 4
])
def test_allowed_world_sizes_divide_the_micro_batches_of_one_step(global_batch, micro_batch, sizes):
    assert allowed_world_sizes(global_batch, micro_batch) == sizes


# --------------------------------------------------------------------------------------------------
# check_device


@pytest.mark.parametrize("argv, device", [
    (["--gpus-per-node", "8"], torch.device("cuda")),
    (["--gpus-per-node", "1"], torch.device("cuda")),
    ([], torch.device("cuda")),
    (["--gpus-per-node", "0"], torch.device("cpu")),
    (["--gpus-per-node", "0", "--tasks-per-node", "4"], torch.device("cpu")),
])
def test_check_device_is_cuda_for_gpu_nodes_and_cpu_for_cpu_nodes(argv, device):
    args, _ = parse_args(argv)
    assert check_device(args) == device


# --------------------------------------------------------------------------------------------------
# job_argv: the training options of every (re)start


def test_job_argv_adds_no_progress_the_job_output_folder_and_resume_auto(tmp_path):
    args, train_argv = parse_args(["--job-dir", str(tmp_path / "jd"), "--", "--max-steps", "5", "--lr", "0.01"])
    assert job_argv(args, parse_train_config(train_argv)) == (
        "--no-progress", "--ckpt-every", "0", "--ckpt-minutes", "10", "--max-steps", "5", "--lr", "0.01",
        "--out", str(tmp_path / "jd" / "train"), "--resume", "auto")


def test_job_argv_output_folder_is_absolute_for_a_relative_job_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, train_argv = parse_args(["--name", "exp1"])
    argv = job_argv(args, parse_train_config(train_argv))
    assert argv == ("--no-progress", "--ckpt-every", "0", "--ckpt-minutes", "10",
                    "--out", str(Path.cwd() / "runs" / "exp1" / "train"), "--resume", "auto")


def test_job_argv_parses_back_to_the_job_folder_resuming_without_progress_bar(tmp_path):
    args, train_argv = parse_args(["--job-dir", str(tmp_path), "--", "--max-steps", "7"])
    cfg = parse_train_config(list(job_argv(args, parse_train_config(train_argv))))
    assert (cfg.out, cfg.resume, cfg.progress, cfg.max_steps) == (str(tmp_path / "train"), "auto", False, 7)


def test_job_argv_accepts_the_entrys_default_out_and_overrides_it(tmp_path):
    args, train_argv = parse_args(["--job-dir", str(tmp_path), "--", "--out", "runs/default", "--resume", "auto"])
    argv = job_argv(args, parse_train_config(train_argv))
    assert parse_train_config(list(argv)).out == str(tmp_path / "train")


@pytest.mark.parametrize("train", [["--out", "elsewhere"], ["--resume", "never"]])
def test_job_argv_refuses_a_user_out_or_resume(train, tmp_path):
    args, train_argv = parse_args(["--job-dir", str(tmp_path), "--", *train])
    with pytest.raises(LaunchError) as err:
        job_argv(args, parse_train_config(train_argv))
    assert str(err.value) == ("the launcher sets --out to JOB_DIR/train and always resumes from there "
                              "(--resume auto): choose the folder with --job-dir, and a new one for a fresh run")


def test_job_argv_refuses_train_default_out_for_distillation(tmp_path):
    """distill's default --out is runs/distill: runs/default is the user's choice there."""
    args, train_argv = parse_args(["--entry", "distill", "--job-dir", str(tmp_path), "--", "--out", "runs/default"])
    with pytest.raises(LaunchError, match="the launcher sets --out"):
        job_argv(args, parse_distill_config(train_argv))


def test_job_argv_for_distillation(tmp_path):
    args, train_argv = parse_args(["--entry", "distill", "--job-dir", str(tmp_path), "--", "--rounds", "2"])
    assert job_argv(args, parse_distill_config(train_argv)) == (
        "--no-progress", "--ckpt-every", "0", "--ckpt-minutes", "10", "--rounds", "2", "--out",
        str(tmp_path / "train"), "--resume", "auto")


def test_launch_error_is_a_value_error():
    assert issubclass(LaunchError, ValueError)


# --------------------------------------------------------------------------------------------------
# slurm_parameters and sbatch_script: the sbatch lines


JOB_SETUP = ["export PYTHONFAULTHANDLER=1", "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
             "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]


def job_setup(job_dir: Path, max_retries: int = 2) -> list[str]:
    """The batch script's lines before srun for a job folder without spaces: the environment, the file
    where rank 0 records how the run ended, the SIGTERM mark and the retry decision on exit."""
    logs, retry = job_dir.absolute() / "logs", Path(checks_module.__file__).parent / "retry.py"
    return JOB_SETUP + [
        f'export PGM_END_FILE={logs}/"${{SLURM_JOB_ID}}_${{SLURM_RESTART_COUNT:-0}}_end"',
        'rm -f "$PGM_END_FILE"',
        "trap 'PGM_SIGNALLED=1' TERM",
        f'pgm_after_tasks() {{ rc=$?; {sys.executable} {retry} --logs {logs} --rc "$rc" --max-retries {max_retries} '
        '${PGM_SIGNALLED:+--signalled}; exit "$rc"; }',
        "trap pgm_after_tasks EXIT"]


def test_slurm_parameters_of_a_fixed_node_count(tmp_path):
    args, _ = parse_args(["--nodes", "3", "--gpus-per-node", "4", "--time", "1:30:00", "--job-dir", str(tmp_path)])
    assert slurm_parameters(args) == {"job_name": "pgm", "time": 90, "nodes": 3, "ntasks_per_node": 4,
                                      "signal_delay_s": 120,
                                      "additional_parameters": {"requeue": True, "exclusive": True},
                                      "srun_args": ["--kill-on-bad-exit=1"], "setup": job_setup(tmp_path),
                                      "gpus_per_node": 4, "mem": "0"}


def test_slurm_parameters_of_a_node_range_move_tasks_per_node_to_srun(tmp_path):
    args, _ = parse_args(["--nodes", "2-8", "--partition", "gpu", "--mem-gb", "1.5", "--cpus-per-task", "4",
                          "--account", "acc", "--qos", "high", "--constraint", "h100", "--name", "r",
                          "--signal-delay", "300", "--job-dir", str(tmp_path)])
    assert slurm_parameters(args) == {
        "job_name": "r", "time": 240, "nodes": 2, "signal_delay_s": 300,
        "additional_parameters": {"requeue": True, "nodes": "2-8", "exclusive": True},
        "srun_args": ["--kill-on-bad-exit=1", "--ntasks-per-node=8", "--cpus-per-task=4"], "setup": job_setup(tmp_path),
        "gpus_per_node": 8, "mem": "1536M", "cpus_per_task": 4,
        "partition": "gpu", "account": "acc", "qos": "high", "constraint": "h100"}


@pytest.mark.parametrize("mem_gb, mem", [("1.5", "1536M"), ("64", "65536M"), ("0.001", "1M"), ("2.0005", "2049M")])
def test_slurm_parameters_memory_is_rounded_to_mebibytes(mem_gb, mem):
    args, _ = parse_args(["--mem-gb", mem_gb])
    assert slurm_parameters(args)["mem"] == mem


def test_slurm_parameters_omit_gpus_and_memory_for_cpu_nodes_without_mem():
    args, _ = parse_args(["--gpus-per-node", "0"])
    params = slurm_parameters(args)
    assert "gpus_per_node" not in params and "mem" not in params
    assert "exclusive" not in params["additional_parameters"]  # CPU nodes are shared unless asked


@pytest.mark.parametrize("argv, exclusive, mem", [
    ([], True, "0"),  # GPU nodes: whole nodes, all their memory
    (["--no-exclusive"], False, "0"),
    (["--mem-gb", "100"], True, "102400M"),
    (["--gpus-per-node", "0", "--exclusive"], True, None),
    (["--gpus-per-node", "0"], False, None),
])
def test_gpu_jobs_take_whole_nodes_unless_told_otherwise(argv, exclusive, mem):
    params = slurm_parameters(parse_args(argv)[0])
    assert params["additional_parameters"].get("exclusive", False) is exclusive
    assert params.get("mem") == mem


def test_every_slurm_job_kills_the_step_when_a_rank_dies_and_sets_the_diagnostics():
    script = sbatch_script(parse_args(["--nodes", "2", "--cpus-per-task", "12"])[0])
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " --kill-on-bad-exit=1 " in srun[0] and " --cpus-per-task=12 " in srun[0]
    for line in JOB_SETUP:
        assert line in script.splitlines()
    assert "#SBATCH --exclusive" in script and "#SBATCH --mem=0" in script


@pytest.mark.parametrize("option", ["--name", "--partition", "--account", "--qos", "--constraint", "--job-dir"])
@pytest.mark.parametrize("bad", ["a\nsrun rm -rf ~", "a\rb", "a\0b"])
def test_a_line_break_or_nul_in_a_batch_script_value_is_refused(option, bad, capsys):
    message = launcher_error([option, bad], capsys)
    assert f"{option} {bad!r} holds a line break or NUL" in message


def test_logs_folder_is_the_absolute_job_dir_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, _ = parse_args(["--name", "exp"])
    assert logs_folder(args) == Path.cwd() / "runs" / "exp" / "logs"


def test_sbatch_script_of_a_fixed_node_count(tmp_path):
    args, _ = parse_args(["--nodes", "3", "--gpus-per-node", "0", "--time", "90", "--signal-delay", "30",
                          "--name", "cpu-run", "--job-dir", str(tmp_path)])
    logs = tmp_path / "logs"
    assert sbatch_lines(sbatch_script(args)) == {
        "#SBATCH --job-name=cpu-run", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=90",
        "#SBATCH --signal=USR2@30", "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --wckey=submitit",
        f"#SBATCH --output={logs}/%j_0_log.out", f"#SBATCH --error={logs}/%j_0_log.err"}


def test_sbatch_script_of_a_node_range_is_exclusive_with_tasks_per_node_on_srun(tmp_path):
    args, _ = parse_args(["--nodes", "2-8", "--gpus-per-node", "4", "--mem-gb", "1.5", "--partition", "gpu",
                          "--time", "1-0", "--job-dir", str(tmp_path)])
    script = sbatch_script(args)
    lines = sbatch_lines(script)
    assert {"#SBATCH --nodes=2-8", "#SBATCH --exclusive", "#SBATCH --gpus-per-node=4", "#SBATCH --mem=1536M",
            "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --requeue", "#SBATCH --signal=USR2@120"} <= lines
    assert not any(line.startswith("#SBATCH --ntasks-per-node") for line in lines)
    assert "--ntasks-per-node=4" in srun_line(script).split()


def test_sbatch_script_runs_submitits_entry_on_the_logs_folder(tmp_path):
    args, _ = parse_args(["--job-dir", str(tmp_path / "job dir")])  # a space: quoted for the shell
    line = srun_line(sbatch_script(args))
    assert line.endswith(f"-u -m submitit.core._submit '{tmp_path / 'job dir' / 'logs'}'")


# --------------------------------------------------------------------------------------------------
# followup: what the user runs next


def test_followup_of_a_slurm_job(tmp_path):
    args, _ = parse_args(["--nodes", "2-4", "--gpus-per-node", "2", "--name", "big", "--job-dir", str(tmp_path)])
    job = SimpleNamespace(job_id="4242", paths=SimpleNamespace(stdout=tmp_path / "logs" / "4242_0_log.out"))
    out = tmp_path / "train"
    assert followup(args, job).splitlines() == [
        "submitted job 4242: big, 2-4 node(s) x 2 task(s)",
        f"logs:        {tmp_path}/logs/4242_0_log.out  (.err beside it; one pair per task)",
        f"output:      {out}  (checkpoints, config.json)",
        f"TensorBoard: tensorboard --logdir {out}/tb",
        f"follow:      squeue -j 4242    tail -f {tmp_path}/logs/4242_0_log.out",
        "preempt:     scancel --signal=USR2 4242   (saves, requeues, resumes)",
        "cancel:      scancel 4242"]


def test_followup_of_a_local_job_says_it_waits_instead_of_squeue(tmp_path):
    args, _ = parse_args(["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--job-dir", str(tmp_path)])
    job = SimpleNamespace(job_id="777", paths=SimpleNamespace(stdout=tmp_path / "logs" / "777_0_log.out"))
    lines = followup(args, job).splitlines()
    assert lines[0] == "submitted job 777: pgm, 1 node(s) x 2 task(s)"
    assert lines[-1] == "running here (controller pid 777); waiting for it to finish"
    assert len(lines) == 5
    assert not any("scancel" in line or "squeue" in line for line in lines)


# --------------------------------------------------------------------------------------------------
# entries: what --entry runs


def test_entries_are_train_and_distill():
    assert sorted(entries()) == ["distill", "train"]


def test_train_entry_uses_trainings_own_functions():
    entry = entries()["train"]
    assert (entry.parse, entry.check, entry.prepare, entry.run) == (
        parse_train_config, check_before_launch, prepare_process, run)


def test_distill_entry_parses_distillation_options_and_trains_with_the_same_run():
    entry = entries()["distill"]
    assert entry.parse is parse_distill_config and entry.run is run
    assert isinstance(entry.parse([]), DistillConfig)


def test_train_entry_parse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        entries()["train"].parse(["--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_distill_entry_check_refuses_a_missing_teacher(tmp_path, ds_config):
    cfg = parse_distill_config(["--teacher", str(tmp_path / "none"), "--ds_config", str(ds_config)])
    with pytest.raises(ConfigError, match=r"^--teacher: "):
        entries()["distill"].check(cfg, [1], torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# check_before_launch: what the job would refuse at any world size it may get (no --data: nothing read)


def test_check_before_launch_names_the_allowed_world_sizes(ds_config):
    cfg = TrainConfig(ds_config=str(ds_config), global_batch=8, micro_batch=4)
    with pytest.raises(ConfigError) as err:
        check_before_launch(cfg, [2, 3], torch.device("cpu"))
    assert str(err.value) == ("global batch 8 with micro-batch 4 allows world sizes 1, 2; the job may get 2, 3: "
                              "change --global-batch / --micro-batch or the node range")


def test_check_before_launch_uses_the_ds_configs_batch_without_overrides(ds_config):
    cfg = TrainConfig(ds_config=str(ds_config))  # 16 / 8 in the file
    with pytest.raises(ConfigError, match=r"^global batch 16 with micro-batch 8 allows world sizes 1, 2; "
                                          r"the job may get 8:"):
        check_before_launch(cfg, [8], torch.device("cpu"))


@pytest.mark.parametrize("sizes", [[1], [2], [1, 2]])
def test_check_before_launch_passes_world_sizes_the_batch_allows(sizes, ds_config):
    assert check_before_launch(TrainConfig(ds_config=str(ds_config)), sizes, torch.device("cpu")) is None


def test_check_before_launch_refuses_a_global_batch_that_is_no_multiple_of_the_micro_batch(ds_config):
    cfg = TrainConfig(ds_config=str(ds_config), global_batch=10, micro_batch=4)
    with pytest.raises(ConfigError) as err:
        check_before_launch(cfg, [1], torch.device("cpu"))
    assert str(err.value) == ("global batch 10 is not a multiple of micro-batch 4 x 1 ranks; change "
                              "--global-batch or --micro-batch")


def test_check_before_launch_refuses_a_missing_ds_config(tmp_path):
    cfg = TrainConfig(ds_config=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="DeepSpeed config .*nope.json not found"):
        check_before_launch(cfg, [1], torch.device("cpu"))


def test_launcher_checks_a_node_range_whose_world_sizes_the_batch_allows(ds_config, tmp_path):
    """--nodes 2-4 x 2 GPUs: world sizes 4, 6, 8; global 48 / micro 2 allows 1, 2, 3, 4, 6, 8, 12, 24."""
    args, train_argv = parse_args(["--nodes", "2-4", "--gpus-per-node", "2", "--job-dir", str(tmp_path), "--",
                                   "--ds_config", str(ds_config), "--global-batch", "48", "--micro-batch", "2"])
    entry = entries()[args.entry]
    cfg = entry.parse(list(job_argv(args, entry.parse(train_argv))))
    assert world_sizes(args) == [4, 6, 8]
    assert entry.check(cfg, world_sizes(args), torch.device("cpu")) is None


def test_launcher_check_refuses_a_node_range_with_a_world_size_the_batch_does_not_divide(ds_config, tmp_path):
    """--nodes 2-4 x 2 GPUs: world sizes 4, 6, 8; global 32 / micro 2 allows 1, 2, 4, 8, 16 (not 6)."""
    args, train_argv = parse_args(["--nodes", "2-4", "--gpus-per-node", "2", "--job-dir", str(tmp_path), "--",
                                   "--ds_config", str(ds_config), "--global-batch", "32", "--micro-batch", "2"])
    entry = entries()[args.entry]
    cfg = entry.parse(list(job_argv(args, entry.parse(train_argv))))
    with pytest.raises(ConfigError) as err:
        entry.check(cfg, world_sizes(args), torch.device("cpu"))
    assert str(err.value).startswith("global batch 32 with micro-batch 2 allows world sizes 1, 2, 4, 8, 16; "
                                     "the job may get 4, 6, 8:")


def test_launcher_check_on_gpu_nodes_resolves_for_cuda(ds_config, tmp_path):
    """check_device gives cuda for GPU nodes; the check itself needs no GPU on the login node."""
    args, train_argv = parse_args(["--nodes", "1-2", "--gpus-per-node", "2", "--job-dir", str(tmp_path), "--",
                                   "--ds_config", str(ds_config), "--global-batch", "32", "--micro-batch", "4"])
    assert check_device(args) == torch.device("cuda")
    assert world_sizes(args) == [2, 4]  # 32 / 4 = 8 micro-batches: 1, 2, 4, 8 allowed
    assert check_before_launch(parse_train_config(train_argv), world_sizes(args), check_device(args)) is None


# --------------------------------------------------------------------------------------------------
# the in-job half that needs no SLURM: JobTask's requeue copy, the time left under the LocalExecutor


def test_job_task_checkpoint_resubmits_the_same_task():
    task = JobTask("train", ("--no-progress", "--out", "/x/train", "--resume", "auto"), 120)
    delayed = task.checkpoint()
    assert delayed.function == task and delayed.function is not task
    assert (delayed.args, delayed.kwargs) == ((), {})


def test_job_task_survives_pickling():
    task = JobTask("distill", ("--rounds", "2"), 30)
    assert pickle.loads(pickle.dumps(task)) == task


def test_seconds_left_under_the_local_executor_counts_from_the_start(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_TIMEOUT_S", "600")
    assert seconds_left(time.time() - 100) == pytest.approx(500, abs=5)


def test_seconds_left_is_unknown_outside_slurm_and_the_local_executor(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_LOCAL_TIMEOUT_S", raising=False)
    assert seconds_left(time.time()) is None


def test_slurm_may_warn_up_to_a_minute_early():
    assert SLURM_EARLY_WARNING_S == 60


def test_env_and_setup_lines_reach_the_batch_script_after_the_defaults():
    script = sbatch_script(parse_args(["--env", "HF_HOME=/shared/hf cache", "--env", "NCCL_DEBUG=INFO",
                                       "--setup", "module load cuda/12", "--setup", "source /opt/env.sh"])[0])
    lines = script.splitlines()
    wanted = job_setup(Path("runs/pgm")) + ["export HF_HOME='/shared/hf cache'", "export NCCL_DEBUG=INFO",
                                            "module load cuda/12", "source /opt/env.sh"]
    start = lines.index(wanted[0])
    assert lines[start:start + len(wanted)] == wanted  # in this order: the user's NCCL_DEBUG wins
    assert lines.index("module load cuda/12") < next(i for i, line in enumerate(lines) if line.startswith("srun "))


@pytest.mark.parametrize("argv, message", [
    (["--env", "NOEQUALS"], "--env 'NOEQUALS': give KEY=VALUE with KEY a shell variable name"),
    (["--env", "1X=2"], "--env '1X=2': give KEY=VALUE with KEY a shell variable name"),
    (["--env", "A B=2"], "--env 'A B=2': give KEY=VALUE with KEY a shell variable name"),
    (["--env", "A=x\nrm -rf ~"], "--env A: the value holds a line break or NUL"),
    (["--setup", "module load x\nrm -rf ~"], "--setup 'module load x\\nrm -rf ~': one shell line per --setup"),
])
def test_bad_env_and_setup_values_are_refused(argv, message, capsys):
    assert message in launcher_error(argv, capsys)


def test_job_argv_makes_local_paths_absolute_and_leaves_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, train_argv = parse_args(["--", "--data", "shards/owt", "--ds_config=ds_configs/zero3.json", "--max-steps",
                                   "5", "--train-shards", "pipe:curl -s https://x/train-{0..3}.tar"])
    argv = job_argv(args, parse_train_config(train_argv))
    assert argv[:12] == ("--no-progress", "--ckpt-every", "0", "--ckpt-minutes", "10",
                         "--data", str(tmp_path / "shards" / "owt"),
                        f"--ds_config={tmp_path / 'ds_configs' / 'zero3.json'}", "--max-steps", "5",
                        "--train-shards", "pipe:curl -s https://x/train-{0..3}.tar")


@pytest.mark.parametrize("argv, expected", [
    (["--teacher", "runs/default"], ["--teacher", "{cwd}/runs/default"]),
    (["--teacher=/abs/run"], ["--teacher=/abs/run"]),
    (["--train-shards", "https://data.example.org/train-{0..9}.tar"], ["--train-shards",
                                                                       "https://data.example.org/train-{0..9}.tar"]),
    (["--data", "d", "--lr", "0.1"], ["--data", "{cwd}/d", "--lr", "0.1"]),
])
def test_absolute_paths(argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_paths(argv) == [item.replace("{cwd}", str(tmp_path)) for item in expected]


# --------------------------------------------------------------------------------------------------
# A job folder that already holds a run: refused unless --continue, which lists what changed

def _job_folder_with_a_run(tmp_path, **train_config) -> Path:
    """JOB_DIR whose train/checkpoints holds one complete checkpoint (the pre-move fixture's)."""
    from tests.helpers.legacy import LEGACY

    job_dir = tmp_path / "jd"
    (checkpoint,) = (LEGACY / "checkpoint").iterdir()
    target = job_dir / "train" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, target)
    state = json.loads((target / "pgm_state.json").read_text())
    state["train_config"].update(train_config)
    (target / "pgm_state.json").write_text(json.dumps(state))
    return job_dir


def _cfg(args):
    return parse_train_config(list(job_argv(args, parse_train_config(args.train_argv))))


def test_a_job_folder_holding_a_run_is_refused_without_continue(tmp_path):
    job_dir = _job_folder_with_a_run(tmp_path)
    args, _ = parse_args(["--job-dir", str(job_dir)])
    with pytest.raises(LaunchError, match=r"already holds the checkpoints of a run \(latest: step_00000003\): pass "
                                          "--continue"):
        check_job_folder(args, _cfg(args))


def test_continue_lists_every_changed_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_dir = _job_folder_with_a_run(tmp_path, data="shards", lr=0.001, max_steps=6)
    args, _ = parse_args(["--job-dir", str(job_dir), "--continue", "--", "--data", str(tmp_path / "shards"),
                          "--max-steps", "50", "--lr", "0.001"])
    lines = check_job_folder(args, _cfg(args))
    assert "--continue: max_steps 6 -> 50" in lines
    assert not any("data" in line or "lr " in line for line in lines)  # the same folder, the same rate


@pytest.mark.parametrize("train, key", [(["--model", "mdlm-tiny", "--data", "/shards/owt"], "model"),
                                        (["--data", "/other"], "data")])
def test_continue_refuses_another_model_or_data(train, key, tmp_path):
    job_dir = _job_folder_with_a_run(tmp_path, model="pgm-tiny", data="/shards/owt")
    args, _ = parse_args(["--job-dir", str(job_dir), "--continue", "--", *train])
    with pytest.raises(LaunchError, match=f"a run cannot continue with {key}="):
        check_job_folder(args, _cfg(args))


def test_an_empty_job_folder_needs_no_continue(tmp_path):
    args, _ = parse_args(["--job-dir", str(tmp_path / "new")])
    assert check_job_folder(args, _cfg(args)) == []


@pytest.mark.parametrize("train, every, minutes", [([], 0, 10.0), (["--ckpt-every", "500"], 500, 10.0),
                                                   (["--ckpt-minutes", "3"], 0, 3.0)])
def test_jobs_checkpoint_every_ten_minutes_unless_the_user_says_otherwise(train, every, minutes, tmp_path):
    args, train_argv = parse_args(["--job-dir", str(tmp_path), "--", *train])
    cfg = parse_train_config(list(job_argv(args, parse_train_config(train_argv))))
    assert (cfg.ckpt_every, cfg.ckpt_minutes) == (every, minutes)


def test_the_readmes_elastic_example_is_one_the_launcher_accepts():
    """The README's `--nodes MIN-MAX --continue` example: every world size of its range keeps its batch."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    command = re.search(r"python launcher/submit.py --nodes (\d+-\d+) [^\n]*--continue -- \\\n([^\n]*)", readme)
    assert command, "the README's elastic example"
    args, train_argv = parse_args(["--nodes", command[1], "--", *command[2].split()])
    cfg = parse_train_config(train_argv)
    assert args.nodes.elastic and set(world_sizes(args)) <= set(allowed_world_sizes(cfg.global_batch, cfg.micro_batch))
