"""Distil a trained PGM (or MDLM) with SDTT on the training engine.

    deepspeed pgm_dist/distill.py --ds_config ds_configs/zero2.json [--teacher PATH] [options]

Same launchers, checkpoints, resume and TensorBoard logs as ``pgm_dist/train.py``;
``--help`` lists the options. Every error a user can cause is raised before any
distributed work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgm_dist.distillation.config import parse_distill_config
from pgm_dist.distillation.task import prepare_distillation
from pgm_dist.training.session import launch


def main(argv=None) -> int:
    return launch(parse_distill_config(argv), prepare_distillation)


if __name__ == "__main__":
    sys.exit(main())
