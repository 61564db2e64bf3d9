"""``launcher/submit.py`` end to end: real SLURM (a throw-away two-node cluster on this machine,
tests/helpers/slurm_cluster.py) and submitit's LocalExecutor; CPU, gloo, pgm-tiny on the test corpus.

The uninterrupted two-node run is the reference: a preempted run (SLURM or local, world size
2 both) must log exactly its losses after the resume (fp32; the engine makes resume exact).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from submitit.core.utils import DelayedSubmission
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgm_dist.cluster.options import JOB_CHECKPOINTS
from tests.helpers.slurm_cluster import URGENT, SlurmCluster, missing
from tests.helpers.training import REPO, module_weights, scalar_events, scalars

STEPS = 30
TRAIN = ["--max-steps", str(STEPS), "--global-batch", "8", "--micro-batch", "4", "--log-every", "1",
         "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "1", "--sample-steps", "2", "--num-samples", "1"]
CPU_NODES = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--signal-delay", "30"]


@pytest.fixture(scope="session")
def job_root():
    """Where the SLURM tests' job folders live: not under /tmp, which the launcher refuses for SLURM
    jobs (the other nodes of a real cluster do not see it). Removed at the end."""
    root = Path.home() / ".cache" / "pgm_dist-tests" / f"jobs-{os.getpid()}"
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_dir(job_root, request):
    return job_root / request.node.name


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def launch(args: list[str], cluster: SlurmCluster | None = None, extra_env: dict | None = None,
           **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(cluster.env if cluster else {}),
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "launcher/submit.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def submit(args: list[str], cluster: SlurmCluster, extra_env: dict | None = None) -> str:
    out, err = launch(args, cluster, extra_env).communicate(timeout=120)
    match = re.search(r"submitted job (\d+):", out)
    assert match, f"no job submitted:\n{out}\n{err}"
    return match[1]


def wait_for_step(tb: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tb.exists() and max(scalars(tb).get("train/loss", {0: 0}), default=0) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"no train/loss at step {step} in {tb} after {timeout} s")


def start_texts(tb: Path) -> list[str]:
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    acc.Reload()
    # each card is a fenced block (shown verbatim); its first line says where the (re)start ran
    return [e.tensor_proto.string_val[0].decode().split("\n")[1] for e in acc.Tensors("run/start/text_summary")]


def resumed_step(log: Path) -> int:
    return int(re.search(r"resumed from \S+ at step (\d+)", log.read_text())[1])


def assert_contiguous_run(tb: Path, max_steps: int = STEPS) -> dict:
    """The loss was logged once at every step 1..max_steps across all (re)starts; returns the scalars."""
    steps = [step for step, _ in scalar_events(tb)["train/loss"]]
    assert sorted(steps) == list(range(1, max_steps + 1)), steps
    values = scalars(tb)
    assert all(math.isfinite(v) for v in values["train/loss"].values())
    return values


@pytest.fixture(scope="session")
def reference(cluster, data, job_root):
    """An uninterrupted two-node job."""
    job_dir = job_root / "reference"
    job = submit(["--nodes", "2", *CPU_NODES, "--time", "60", "--job-dir", str(job_dir), "--",
                  "--data", str(data), *TRAIN], cluster)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300) == "COMPLETED"
    return job, job_dir


def test_two_node_job_trains_on_two_slurm_nodes(cluster, reference):
    job, job_dir = reference
    out = job_dir / "train"
    values = assert_contiguous_run(out / "tb")
    assert values["run/world_size"][STEPS] == 2 and values["run/nodes"][0] == 2 and values["run/restarts"][STEPS] == 0
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert cluster.job_field(job, "NodeList") == "n[1-2]" and cluster.job_field(job, "NumNodes") == "2"
    for rank in (0, 1):  # each rank on its own SLURM node
        log = (job_dir / "logs" / f"{job}_{rank}_log.out").read_text()
        assert f"node={rank}(2), global_rank={rank}(2)" in log
    assert start_texts(out / "tb") == [f"job {job} on n1,n2: world size 2, restart 0, step 0"]


def test_distill_entry_runs_two_rounds_on_two_slurm_nodes(cluster, reference, data, job_dir, capsys, monkeypatch):
    """``--entry distill`` distils the reference run (the teacher) for two rounds of 2 steps; the
    dry run prints the options every (re)start gets and submits nothing."""
    distill = ["--teacher", str(reference[1] / "train"), "--data", str(data), "--start-steps", "8",
               "--round-steps", "2", "--rounds", "2", "--min-steps", "2", "--global-batch", "4", "--micro-batch", "2",
               "--log-every", "1", "--eval-every", "0", "--ckpt-every", "2", "--eval-batches", "1",
               "--sample-steps", "2", "--num-samples", "1", "--eval-samples", "1", "--lr", "1e-2", "--warmup-steps", "0"]
    args = ["--nodes", "2", *CPU_NODES, "--time", "60", "--job-dir", str(job_dir), "--entry", "distill"]
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    before = cluster.job_ids()
    assert _submit_main()([*args, "--dry-run", "--", *distill]) == 0
    assert (f"#   --no-progress {' '.join(JOB_CHECKPOINTS)} {' '.join(distill)} --out {job_dir / 'train'} "
            "--resume auto\n") in capsys.readouterr().out
    assert cluster.job_ids() == before

    job = submit([*args, "--", *distill], cluster)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300) == "COMPLETED"
    out = job_dir / "train"
    values = scalars(out / "tb")
    assert values["distill/round"] == {step: (step - 1) // 2 for step in range(1, 5)}
    assert values["distill/sampling_steps"] == {1: 4, 2: 4, 3: 2, 4: 2}
    assert values["run/world_size"][4] == 2
    # The round-1 teacher, saved with the last checkpoint, is the student's raw weights at step 2.
    boundary = module_weights(out / "checkpoints" / "step_00000002")
    final = out / "checkpoints" / "step_00000004"
    assert (final / "COMPLETE").exists()
    teacher = load_file(str(final / "teacher.safetensors"))
    assert teacher.keys() == boundary.keys()
    for name, tensor in boundary.items():
        torch.testing.assert_close(teacher[name], tensor.float(), atol=0, rtol=0)


def test_preemption_saves_requeues_and_resumes_exactly(cluster, reference, data, job_dir):
    job = submit(["--nodes", "2", *CPU_NODES, "--time", "60", "--job-dir", str(job_dir), "--",
                  "--data", str(data), *TRAIN], cluster)
    wait_for_step(job_dir / "train" / "tb", 4)
    cluster.run("scancel", "--signal=USR2", job)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300) == "COMPLETED"
    assert cluster.job_field(job, "Restarts") == "1"
    stopped = resumed_step(job_dir / "logs" / f"{job}_0_log.out")
    assert 4 <= stopped < STEPS
    values = assert_contiguous_run(job_dir / "train" / "tb")
    assert values["run/restarts"][STEPS] == 1
    assert values["train/loss"] == scalars(reference[1] / "train" / "tb")["train/loss"]
    # A preemption does not use up a time-out requeue (--max-requeues, default 3).
    assert DelayedSubmission.load(job_dir / "logs" / f"{job}_submitted.pkl")._timeout_countdown == 3


def test_plain_scancel_saves_and_stops_for_good(cluster, data, job_dir):
    """``scancel JOB`` (SIGTERM to every task): every rank saves at the next step and the job ends
    CANCELLED, never requeued (SLURM would requeue a cancelled --requeue job if rank 0 asked)."""
    # Long enough to be still training after the second submission below (seconds of start-up).
    job = submit(["--nodes", "2", *CPU_NODES, "--time", "60", "--job-dir", str(job_dir), "--",
                  "--data", str(data), *TRAIN, "--max-steps", "5000"], cluster)
    wait_for_step(job_dir / "train" / "tb", 3)
    # One live job per run folder: a second submission into it is refused while this one trains.
    second = launch(["--nodes", "2", *CPU_NODES, "--continue", "--job-dir", str(job_dir), "--",
                     "--data", str(data), *TRAIN], cluster)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, out + err
    assert f"is the run folder of SLURM job {job}, which is still running" in err
    cluster.run("scancel", job)
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "PENDING"}, timeout=120) == "CANCELLED"
    time.sleep(8)  # a requeue would show by now
    assert (cluster.job_field(job, "JobState"), cluster.job_field(job, "Restarts")) == ("CANCELLED", "0")
    log = (job_dir / "logs" / f"{job}_0_log.out").read_text()
    stopped = int(re.search(r"stopped at step (\d+)", log)[1])
    assert 3 <= stopped < 5000
    assert (job_dir / "train" / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").exists()
    assert "the run stopped" in log  # the batch script's retry decision: nothing to retry


def rank_process(job: str, rank: int) -> int:
    """The pid of ``rank``'s Python process in SLURM job ``job`` (read from /proc: the test cluster's
    nodes are this machine)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = dict(item.split("=", 1) for item in environ.read_text().split("\0") if "=" in item)
            command = (environ.parent / "cmdline").read_text()
        except OSError:
            continue
        if (variables.get("SLURM_JOB_ID") == job and variables.get("SLURM_PROCID") == str(rank)
                and "submitit.core._submit" in command):
            return int(environ.parent.name)
    raise AssertionError(f"no rank {rank} process of job {job}")


def test_a_killed_rank_ends_the_step_and_the_job_is_retried_exactly(cluster, reference, data, job_dir):
    """SIGKILL to rank 1 (on n2) of a running two-node job: srun --kill-on-bad-exit ends the step at
    once (rank 0 does not wait in a collective for the 10-minute process-group timeout), the batch
    script requeues the job (retry 1 of --max-retries 1), and it resumes from its last checkpoint:
    the losses are the uninterrupted run's, every step logged once. The submitting shell exports
    torch.distributed variables of its own (sbatch passes them on): the job's own win."""
    login_shell = {"MASTER_ADDR": "no-such-host", "MASTER_PORT": "1", "RANK": "5", "WORLD_SIZE": "9"}
    job = submit(["--nodes", "2", *CPU_NODES, "--time", "60", "--max-retries", "1", "--job-dir", str(job_dir),
                  "--", "--data", str(data), *TRAIN, "--ckpt-every", "3", "--dist-timeout-min", "10"], cluster,
                 login_shell)
    wait_for_step(job_dir / "train" / "tb", 5)
    killed = time.monotonic()
    os.kill(rank_process(job, 1), signal.SIGKILL)
    while cluster.job_field(job, "Restarts") == "0":
        assert time.monotonic() - killed < 120, cluster.job_field(job, "JobState")
        time.sleep(0.5)
    requeued_after = time.monotonic() - killed
    assert requeued_after < 60  # far from the 600 s a collective would have waited
    assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300) == "COMPLETED"
    assert cluster.job_field(job, "Restarts") == "1"
    assert (job_dir / "logs" / f"{job}_retries").read_text() == "1\n"
    log = (job_dir / "logs" / f"{job}_0_log.out").read_text()
    assert "retry 1 of 1 (--max-retries)" in log and "the run finished" in log
    resumed = resumed_step(job_dir / "logs" / f"{job}_0_log.out")
    assert resumed % 3 == 0 and resumed >= 3
    values = assert_contiguous_run(job_dir / "train" / "tb")
    assert values["run/restarts"][STEPS] == 1
    assert values["train/loss"] == scalars(reference[1] / "train" / "tb")["train/loss"]
    print(f"killed rank: requeued {requeued_after:.1f} s after the kill, resumed at step {resumed}")


def test_a_scheduler_preemption_saves_and_slurm_requeues_the_job_once(cluster, reference, data, job_dir):
    """A job in the higher-tier partition takes both nodes (PreemptMode=REQUEUE, GraceTime 30 s): the
    training job gets SIGTERM, saves, and SLURM requeues it; the launcher does not requeue it again.
    It ends COMPLETED with Restarts=1 and every step logged once, resumed at the very step it saved.
    SLURM preempts at its next scheduling pass (seconds): a fast machine can finish the 30 steps first;
    such a run proves nothing and is repeated with ten times the steps (the constant learning rate
    keeps the first 30 losses those of the reference run)."""
    base = job_dir
    for steps in (STEPS, 10 * STEPS):
        job_dir = base / f"steps{steps}"
        job = submit(["--nodes", "2", *CPU_NODES, "--time", "60", "--job-dir", str(job_dir), "--",
                      "--data", str(data), *TRAIN, "--max-steps", str(steps)], cluster)
        wait_for_step(job_dir / "train" / "tb", 4)
        urgent = cluster.run("sbatch", "--parsable", "-p", URGENT, "-N", "2", "--output", "/dev/null",
                             "--wrap", "sleep 5").stdout.strip()
        assert cluster.wait_job(urgent, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180) == "COMPLETED"
        assert cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=3 * steps + 210) == "COMPLETED"
        log = (job_dir / "logs" / f"{job}_0_log.out").read_text()
        if cluster.job_field(job, "Restarts") != "0" or "stopped at step" in log:
            break
    assert cluster.job_field(job, "Restarts") == "1", f"{log}\nslurmctld:\n{cluster.controller_log(job)}"
    stopped = int(re.search(r"stopped at step (\d+)", log)[1])
    assert 4 <= stopped < steps and resumed_step(job_dir / "logs" / f"{job}_0_log.out") == stopped
    # SLURM requeues only a job still running when the grace time ends: this one saved and exited within
    # it, so rank 0 requeued it (once: Restarts is 1), and the batch script did not retry it
    assert f"job {job} was preempted by the scheduler: saved, requeueing it" in log and "the run stopped" in log
    values = assert_contiguous_run(job_dir / "train" / "tb", steps)
    assert values["run/restarts"][steps] == 1
    expected = scalars(reference[1] / "train" / "tb")["train/loss"]
    assert {step: values["train/loss"][step] for step in expected} == expected
    # the time-out requeues (--max-requeues 3) are untouched: a preemption is not a time-out
    assert DelayedSubmission.load(job_dir / "logs" / f"{job}_submitted.pkl")._timeout_countdown == 3


def test_time_limit_on_a_drained_node_requeues_and_finishes_on_one_node(cluster, data, job_dir):
    """``--nodes 1-2``: starts on both nodes; n2 is drained and the time limit runs out; the warning
    signal saves, the job requeues (one time-out of --max-requeues 1) and finishes on n1 alone through
    the universal checkpoint. SLURM checks time limits every 30 s, so a fast machine can finish a short
    run before the warning: such a run proves nothing and is repeated with four times the steps."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
    base = job_dir
    for steps in (250, 1000, 4000):
        job_dir = base / f"steps{steps}"
        deadline = time.monotonic() + 60  # the previous job may still be completing on a node
        while cluster.idle_nodes() != {"n1", "n2"} and time.monotonic() < deadline:
            time.sleep(0.5)
        job = submit(["--nodes", "1-2", *CPU_NODES, "--time", "10", "--max-requeues", "1", "--job-dir",
                      str(job_dir), "--", "--data", str(data), *TRAIN, "--max-steps", str(steps)], cluster)
        wait_for_step(job_dir / "train" / "tb", 3)
        assert cluster.job_field(job, "NumNodes") == "2"
        cluster.run("scontrol", "update", "nodename=n2", "state=drain", "reason=test")
        try:
            # The limit, counted from the job's start, now ends within a minute: SLURM's warning comes
            # at its next time-limit check. The requeued job gets a long limit back.
            cluster.run("scontrol", "update", f"jobid={job}", "timelimit=1")
            deadline = time.monotonic() + 120
            while (cluster.job_field(job, "Restarts") == "0" and cluster.job_field(job, "JobState") not in final
                   and time.monotonic() < deadline):
                time.sleep(0.5)
            if cluster.job_field(job, "Restarts") == "0":  # no warning reached it: finished first, or a bug
                assert cluster.job_field(job, "JobState") == "COMPLETED", cluster.job_field(job, "JobState")
                continue
            # While the requeue is in progress SLURM refuses updates of the job for a moment: retry.
            deadline = time.monotonic() + 60
            while cluster.run("scontrol", "update", f"jobid={job}", "timelimit=10", check=False).returncode:
                assert time.monotonic() < deadline, cluster.job_field(job, "JobState")
                time.sleep(0.5)
            assert cluster.wait_job(job, final, timeout=600) == "COMPLETED"
        finally:
            cluster.run("scontrol", "update", "nodename=n2", "state=resume")
        break
    else:
        pytest.fail("every run finished before SLURM's time-limit warning")
    assert cluster.job_field(job, "Restarts") == "1" and cluster.job_field(job, "NodeList") == "n1"
    stopped = resumed_step(job_dir / "logs" / f"{job}_0_log.out")
    assert (job_dir / "train" / "checkpoints" / f"step_{stopped:08d}_universal" / "UNIVERSAL_COMPLETE").exists()
    values = assert_contiguous_run(job_dir / "train" / "tb", steps)
    assert values["run/world_size"][stopped - 1] == 2 and values["run/world_size"][steps] == 1
    assert values["run/restarts"][steps] == 1 and values["run/nodes"][stopped] == 1
    assert start_texts(job_dir / "train" / "tb") == [
        f"job {job} on n1,n2: world size 2, restart 0, step 0", f"job {job} on n1: world size 1, restart 1, step {stopped}"]
    assert (job_dir / "train" / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").exists()
    assert DelayedSubmission.load(job_dir / "logs" / f"{job}_submitted.pkl")._timeout_countdown == 0


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_local_job_preempted_requeues_and_resumes_exactly(reference, data, tmp_path):
    """``--local``: two local processes; SIGUSR2 to both tasks (submitit's ``LocalJob._interrupt``
    signals the controller, which does not handle it) saves, exits 144, and the LocalExecutor
    restarts the tasks, which resume."""
    proc = launch(["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10",
                   "--signal-delay", "30", "--job-dir", str(tmp_path), "--", "--data", str(data), *TRAIN])
    controller = int(re.search(r"submitted job (\d+):", proc.stdout.readline())[1])
    wait_for_step(tmp_path / "train" / "tb", 4)
    tasks = _children(controller)
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"job {controller}: finished" in out, out + err
    stopped = resumed_step(tmp_path / "logs" / f"{controller}_0_log.out")
    assert 4 <= stopped < STEPS
    values = assert_contiguous_run(tmp_path / "train" / "tb")
    assert values["run/restarts"][STEPS] == 1
    assert values["train/loss"] == scalars(reference[1] / "train" / "tb")["train/loss"]


def _submit_main():
    spec = importlib.util.spec_from_file_location("submit_cli", REPO / "launcher" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


BAD_INPUTS = [
    (["--nodes", "0"], "at least one node"),
    (["--nodes", "5-2"], "the range is empty"),
    (["--time", "ten"], "cannot read 'ten' as a SLURM time"),
    (["--", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--", "--model", "pgm-huge"], "invalid choice: 'pgm-huge'"),
    (["--", "--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    (["--nodes", "2-3", "--", "--global-batch", "8", "--micro-batch", "4"], "allows world sizes 1, 2; the job may get 2, 3"),
    (["--", "--out", "elsewhere"], "the launcher sets --out"),
    (["--entry", "distill", "--", "--teacher", "/nonexistent"], "--teacher: /nonexistent is neither an export"),
    (["--entry", "distill", "--", "--out", "runs/default"], "the launcher sets --out"),  # not distill's default
]


def test_bad_inputs_error_before_submitting(cluster, data, job_dir, capsys, monkeypatch):
    main = _submit_main()
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    before = cluster.job_ids()
    for args, message in BAD_INPUTS:
        argv = [*args[:args.index("--")]] if "--" in args else list(args)
        train = args[args.index("--") + 1:] if "--" in args else []
        full = [*argv, *CPU_NODES, "--job-dir", str(job_dir), "--", *(["--data", str(data)] if "--data" not in train
                                                                        else []), *train]
        try:
            code = main(full)
        except SystemExit as exit:
            code = exit.code
        assert code == 2, args
        assert message in capsys.readouterr().err, args
    # a job folder under /tmp: the other nodes would not see it
    assert main([*CPU_NODES, "--job-dir", "/tmp/pgm-job", "--", "--data", str(data)]) == 2
    assert "--job-dir /tmp/pgm-job is on a temporary file system" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch: a clear error that suggests --local
    assert main([*CPU_NODES, "--job-dir", str(job_dir), "--", "--data", str(data)]) == 2
    assert "sbatch/srun not found" in capsys.readouterr().err
    assert cluster.job_ids() == before
