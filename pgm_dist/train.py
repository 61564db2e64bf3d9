"""Train a PGM (or the MDLM baseline) with DeepSpeed ZeRO.

    deepspeed pgm_dist/train.py --ds_config ds_configs/zero2.json [options]

Runs under ``deepspeed`` (any ``--num_gpus``), torchrun, or any launcher that sets
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; ``--help`` lists the options.
Every error a user can cause is raised before any distributed work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgm_dist.training.config import parse_train_config
from pgm_dist.training.session import launch


def main(argv=None) -> int:
    return launch(parse_train_config(argv))


if __name__ == "__main__":
    sys.exit(main())
