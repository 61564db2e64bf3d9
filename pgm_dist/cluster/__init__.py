"""The SLURM launcher: the login-node half (submit) and the in-job task (job); see docs/cluster.md."""
