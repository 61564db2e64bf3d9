"""``sbatch`` refusing a job reaches the user as one clear line (LaunchError, exit 2), not a
traceback. Here ``sbatch`` and ``srun`` are real executables on PATH that answer as SLURM does."""
import pytest

from pgm_dist.cluster.job import JobTask
from pgm_dist.cluster.options import LaunchError, parse_args
from pgm_dist.cluster.submit import submit
from tests.helpers.executables import install

REFUSAL = "sbatch: error: Batch job submission failed: Invalid partition name specified"


@pytest.fixture
def refusing_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    for name, body in (("sbatch", f'echo "{REFUSAL}" >&2\nexit 1'), ("srun", "exit 0")):
        install(bin_dir, name, body)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return tmp_path


def test_an_sbatch_refusal_is_a_launch_error_with_sbatchs_message(refusing_slurm):
    args, _ = parse_args(["--gpus-per-node", "0", "--partition", "nope", "--job-dir", str(refusing_slurm / "jd")])
    with pytest.raises(LaunchError) as err:
        submit(args, JobTask("train", ("--max-steps", "1"), 30))
    assert str(err.value) == f"sbatch refused the job: {REFUSAL}"
