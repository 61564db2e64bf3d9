"""The login-node side of the launcher: a job submitted before the package moved pickled its task
as ``pgm_dist.slurm_job.JobTask`` (and its requeue as a DelayedSubmission of it): both still
unpickle, into today's class; submitting imports no DeepSpeed."""
import pickle
import subprocess
import sys

import cloudpickle
from submitit.core.utils import DelayedSubmission

from pgm_dist.cluster.job import JobTask

OLD, NEW = b"pgm_dist.slurm_job", b"pgm_dist.cluster.job"


def _as_before_the_move(payload: bytes) -> bytes:
    """Protocol 0 names a class as ``c<module>\\n<name>``: the same pickle with the old module path."""
    assert NEW + b"\nJobTask" in payload
    return payload.replace(NEW + b"\nJobTask", OLD + b"\nJobTask")


def test_a_task_pickled_under_the_old_path_unpickles_into_todays_class():
    task = JobTask("train", ("--out", "/runs/a", "--resume", "auto"), 120)
    old = _as_before_the_move(pickle.dumps(task, protocol=0))
    assert OLD in old and NEW not in old
    restored = pickle.loads(old)
    assert type(restored) is JobTask and restored == task


def test_a_queued_submission_of_the_old_path_unpickles():
    """submitit writes the job's pickle with cloudpickle, which names importable classes by path."""
    submission = DelayedSubmission(JobTask("distill", ("--teacher", "runs/default"), 60))
    old = _as_before_the_move(cloudpickle.dumps(submission, protocol=0))
    restored = pickle.loads(old)
    assert type(restored.function) is JobTask
    assert (restored.function.entry, restored.function.argv, restored.function.signal_delay_s) == (
        "distill", ("--teacher", "runs/default"), 60)


def test_the_launcher_imports_no_deepspeed_before_the_job_runs():
    """Importing DeepSpeed on the login node costs seconds and prints its accelerator warning as
    the launcher's first line of output (where ``submitted job N`` belongs)."""
    done = subprocess.run([sys.executable, "-c", "import sys, pgm_dist.cluster.submit, pgm_dist.cluster.job; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]"]
