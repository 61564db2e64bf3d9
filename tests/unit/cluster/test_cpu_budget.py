"""Each rank's CPUs on 8-GPU nodes: floor(node CPUs / tasks per node) from ``sinfo`` (a real
executable on PATH here, answering as sinfo does), passed to srun, and shown in --dry-run."""
import pytest

from pgm_dist.cluster.batch import cpu_budget, node_cpus, sbatch_script
from pgm_dist.cluster.options import parse_args
from tests.helpers.executables import install


@pytest.fixture
def sinfo(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return lambda body: install(tmp_path, "sinfo", body)


def test_node_cpus_is_the_smallest_node_of_the_partition(sinfo):
    sinfo('test "$*" = "-h -N -o %c -p gpu" && printf "96\\n96\\n64\\n"')
    assert node_cpus("gpu") == 64


@pytest.mark.parametrize("body", ["exit 1", "echo n/a", ""])
def test_node_cpus_unknown(sinfo, body):
    sinfo(body)
    assert node_cpus(None) is None


def test_gpu_job_gets_node_cpus_over_tasks_and_srun_gets_them(sinfo):
    sinfo('printf "96\\n96\\n"')
    args, _ = parse_args(["--nodes", "8", "--partition", "gpu"])
    line = cpu_budget(args)
    assert args.cpus_per_task == 12
    assert line.startswith("# each rank: 12 CPUs (OMP_NUM_THREADS=12); room for 10 DataLoader workers")
    script = sbatch_script(args)
    assert "#SBATCH --cpus-per-task=12" in script
    assert " --cpus-per-task=12 " in next(line for line in script.splitlines() if line.startswith("srun "))


def test_a_given_cpus_per_task_is_kept_and_cpu_nodes_ask_nothing(sinfo):
    sinfo("echo 96")
    args, _ = parse_args(["--cpus-per-task", "6"])
    assert cpu_budget(args).startswith("# each rank: 6 CPUs") and args.cpus_per_task == 6
    args, _ = parse_args(["--gpus-per-node", "0"])
    assert cpu_budget(args) == "# each rank: SLURM's default CPUs (--cpus-per-task not given)"
    assert args.cpus_per_task is None


def test_unknown_node_cpus_say_what_to_do(sinfo):
    sinfo("exit 1")
    args, _ = parse_args(["--nodes", "2"])
    assert "pass --cpus-per-task" in cpu_budget(args) and args.cpus_per_task is None
