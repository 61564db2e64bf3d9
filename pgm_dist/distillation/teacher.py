"""The model distillation starts from: a checkpoint, a run folder or an export, and its weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from pgm_dist.checkpoints.format import EMA_FILE
from pgm_dist.checkpoints.load import EXPORT_WEIGHTS, is_export, read_info, resolve_model_dir
from pgm_dist.checkpoints.reference import (
    backbone_state,
    convert_state,
    is_reference_checkpoint,
    read_reference,
    reference_config,
)
from pgm_dist.common.errors import ConfigError
from pgm_dist.distillation.config import DEFAULT_TEACHER


@dataclass
class Teacher:
    source: Path  # the export or checkpoint folder, or a released reference file
    info: dict  # its config.json (export) or pgm_state.json (checkpoint); a reference file's model config
    # a released file's contents, read once (the file is hundreds of MB): its weights come from here
    release: dict | None = field(default=None, repr=False)

    @property
    def is_export(self) -> bool:
        return is_export(self.source)

    @property
    def is_reference(self) -> bool:
        return is_reference_checkpoint(self.source)


def find_teacher(path: str | None) -> Teacher:
    """The checkpoint, export or released file ``--teacher`` names, or the default run's latest
    checkpoint. A released file's tokenizer is the data's (checked by its vocabulary)."""
    if path is not None and is_reference_checkpoint(path):
        try:
            release = read_reference(path)
            config = reference_config(backbone_state(release, "raw", path))
        except ValueError as err:
            raise ConfigError(f"--teacher: {err}") from None
        return Teacher(Path(path), {"model_config": config.to_dict(), "tokenizer_sha256": None}, release)
    try:
        source = resolve_model_dir(path or DEFAULT_TEACHER)
    except FileNotFoundError as err:
        if path is None:
            raise ConfigError(f"no --teacher given and {DEFAULT_TEACHER} holds no complete checkpoint: train one "
                              "first with `deepspeed pgm_dist/train.py --ds_config ds_configs/zero2.json`, "
                              "or pass --teacher PATH") from None
        raise ConfigError(f"--teacher: {err}") from None
    return Teacher(source, read_info(source))


def check_teacher_data(teacher: Teacher, data: str | None) -> None:
    """A released teacher file carries no data folder: ``--data`` must name one built with its tokenizer."""
    if teacher.is_reference and data is None:
        raise ConfigError(f"the released teacher {teacher.source} needs --data: a folder built with its "
                          "tokenizer (python -m pgm_dist.data build --hf-tokenizer gpt2 ...)")


def initial_weights(teacher: Teacher, init_from: str) -> dict[str, torch.Tensor]:
    """fp32 weights by parameter name: ``raw`` = the checkpoint's fp32 master weights (gathered
    from the ZeRO shards, exact also for a bf16 run), ``ema`` = its EMA (an export's weights)."""
    if init_from == "auto":
        init_from = "ema" if teacher.is_export else "raw"
    if teacher.is_reference:
        state = backbone_state(teacher.release, init_from, str(teacher.source))
        return convert_state(state, reference_config(state))
    if teacher.is_export:
        if init_from == "raw":
            raise ConfigError(f"--init-from raw: {teacher.source} is an export, which holds only the EMA weights; "
                              "pass its checkpoint as --teacher, or --init-from ema")
        return load_file(str(teacher.source / EXPORT_WEIGHTS))
    if init_from == "ema":
        return load_file(str(teacher.source / EMA_FILE))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(teacher.source.parent), tag=teacher.source.name)
    return {name: tensor.float() for name, tensor in weights.items()}

