"""Submit a multi-node training job to SLURM with submitit: elastic, preemptible, self-resuming.

    python launcher/submit.py --nodes 8 [options] [-- training options]
    python launcher/submit.py --nodes 4-8 --time 24:00:00 -- --model pgm-6-6-d1024 --data /shared/owt
    python launcher/submit.py --local --gpus-per-node 0 --tasks-per-node 2 -- --max-steps 50
    python launcher/submit.py --nodes 2 --entry distill -- --teacher runs/default

Every task of the job runs the training entry point (``--entry distill``: distillation's)
in-process (one task per GPU, no ``deepspeed`` launcher), with the same options, in
JOB_DIR/train, with ``--resume auto``.
The job saves and requeues itself on preemption (SIGUSR2) and before its time limit;
``docs/cluster.md`` explains how. Every error a user can cause is reported here,
before anything is submitted.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgm_dist.cluster.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
