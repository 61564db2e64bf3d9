"""Old home of the in-job task, kept for one release: a job submitted before the move pickled
``pgm_dist.slurm_job.JobTask`` and still unpickles. New code imports :mod:`pgm_dist.cluster.job`."""
from pgm_dist.cluster.job import JobTask, RequeueAfterSave  # noqa: F401
