"""Run configuration: one typed dataclass, defaults -> command line, saved with every run.

Defaults give the fresh-machine quick start (``pgm-tiny`` on the built-in corpus for
a few minutes on a CPU). The paper's OpenWebText recipe: ``--model pgm-6-6-d1024
--max-steps 1000000 --warmup-steps 2500 --lr 3e-4 --ema-decay 0.9999`` with a
DeepSpeed config whose global batch is 512.
DeepSpeed's own JSON (``--ds_config``) stays DeepSpeed's: parallelism, precision, batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgm_dist.common.cli import HelpFormatter
from pgm_dist.common.errors import ConfigError
from pgm_dist.common.zero import zero_stage
from pgm_dist.models.config import ATTENTION_BACKENDS, PRESETS, ModelConfig


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    ds_config: str = _opt("ds_configs/zero2.json", "DeepSpeed JSON config (ZeRO stage, precision, batch)",
                          flag="--ds_config")
    model: str = _opt("pgm-tiny", "model preset", choices=tuple(PRESETS))
    attention: str = _opt("auto", "attention backend", choices=ATTENTION_BACKENDS)
    loss_chunk: int = _opt(ModelConfig.loss_chunk, "tokens per chunk of the output projection + cross-entropy, so "
                                                   "float32 logits never exist for the whole micro-batch (0: unchunked)")
    fused_loss: bool = _opt(ModelConfig.fused_loss, "with a loss chunk: each chunk's gradients made in the "
                                                    "forward pass, so backward recomputes no logits (off: "
                                                    "checkpointed chunks, their logits recomputed in backward)")
    activation_checkpointing: bool = _opt(False, "recompute each block's activations in backward (less memory, "
                                                 "~1/3 more compute)")
    compile: bool = _opt(False, "torch.compile the model (the Triton attention stays a graph break)")
    dropout: float | None = _opt(None, "override the preset's dropout")
    data: str | None = _opt(None, "data folder from `python -m pgm_dist.data build` "
                                  "(default: build the built-in corpus into data_shards/default)")
    train_shards: str | None = _opt(None, "train shard sources overriding DATA/train-*.tar "
                                          "(brace patterns, pipe:, http(s)://)")
    out: str = _opt("runs/default", "run folder: checkpoints, TensorBoard logs, resolved config")
    max_steps: int = _opt(150, "optimizer steps to train for (in total, across restarts)")
    micro_batch: int | None = _opt(None, "override the DeepSpeed config's train_micro_batch_size_per_gpu")
    global_batch: int | None = _opt(None, "override the DeepSpeed config's train_batch_size")
    lr: float = _opt(1e-3, "peak learning rate (the paper: 3e-4)")
    lr_schedule: str = _opt("constant", "after warm-up", choices=("constant", "cosine"))
    warmup_steps: int = _opt(50, "linear warm-up steps (the paper: 2500)")
    min_lr_ratio: float = _opt(0.1, "cosine schedule: final learning rate / peak")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.999, "AdamW beta2")
    ema_decay: float = _opt(0.9999, "EMA decay of the weights used for evaluation and sampling "
                                    "(warmed up as min(decay, (1+n)/(10+n)))")
    seed: int = _opt(0, "seed of the data order, noise levels, partitions and dropout")
    resume: str = _opt("auto", "auto (latest complete checkpoint in OUT), never (refused when OUT already "
                               "holds checkpoints), or a checkpoint folder")
    log_every: int = _opt(10, "steps between TensorBoard scalars")
    eval_every: int = _opt(100, "steps between validation NELBO evaluations (0: only at the end)")
    eval_batches: int = _opt(20, "validation micro-batches per rank and evaluation")
    sample_every: int = _opt(0, "steps between sampled texts (image runs: pictures) in TensorBoard (0: only at the end)")
    num_samples: int = _opt(3, "texts sampled each time (image runs: pictures per class)")
    sample_steps: int = _opt(64, "sampling steps")
    sample_cfg: float = _opt(2.0, "image runs: classifier-free guidance weight of the sample pictures")
    ckpt_every: int = _opt(100, "steps between checkpoints (0: only at the end)")
    ckpt_minutes: float = _opt(30.0, "also checkpoint when this many minutes passed since the last one (0: off)")
    keep_last: int = _opt(3, "complete checkpoints kept")
    loader_workers: int = _opt(1, "DataLoader worker processes per rank")
    shuffle_shards: int = _opt(4, "shards mixed together by the shuffle buffer")
    max_nonfinite: int = _opt(10, "stop after this many consecutive non-finite steps (each one skipped)")
    dist_timeout_min: float = _opt(10.0, "minutes a collective waits for a missing rank before the run fails "
                                         "(a dead rank's peers stop after this)")
    progress: bool = _opt(True, "show a progress bar on rank 0")

    def __post_init__(self) -> None:
        positive = ("max_steps", "log_every", "eval_batches", "num_samples", "sample_steps", "keep_last",
                    "max_nonfinite", "shuffle_shards")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dist_timeout_min <= 0:
            raise ConfigError(f"--dist-timeout-min must be > 0, got {self.dist_timeout_min}")
        for name in ("eval_every", "sample_every", "ckpt_every", "warmup_steps", "loader_workers", "loss_chunk",
                     "sample_cfg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint folder")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def build_parser(config_cls: type = TrainConfig, prog: str = "deepspeed pgm_dist/train.py",
                 description: str = "Train a PGM (or the MDLM baseline) with DeepSpeed ZeRO.",
                 epilog: str | None = __doc__) -> argparse.ArgumentParser:
    """One option per field of ``config_cls`` (TrainConfig or a subclass such as distillation's),
    except those its ``cli_excluded`` names."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=HelpFormatter)
    for f in dataclasses.fields(config_cls):
        if f.name in getattr(config_cls, "cli_excluded", ()):
            continue
        help_text = f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(_flag(f), dest=f.name, type=kind, default=f.default, help=help_text,
                            choices=f.metadata.get("choices"))
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; ignored")
    return parser


def parse_train_config(argv=None, config_cls: type = TrainConfig, **parser_args) -> TrainConfig:
    parser = build_parser(config_cls, **parser_args)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    try:
        return config_cls(**args)
    except ConfigError as err:
        parser.error(str(err))


def resolve_ds_config(path: str | Path, *, world_size: int, device: torch.device,
                      micro_batch: int | None = None, global_batch: int | None = None) -> dict:
    """Read a DeepSpeed config and resolve what pgm_dist owns in it.

    ``bf16.enabled: "auto"`` -> bf16 where the GPU supports it, fp32 on a CPU. The
    accumulation steps follow from the global batch and the world size, so the global
    batch survives a change of world size.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found (the repository ships ds_configs/zero{{1,2,3}}.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if global_batch is not None:
        cfg["train_batch_size"] = global_batch
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping"):
        if key not in cfg:
            raise ConfigError(f"{path} must set {key!r} explicitly")
    cfg.pop("gradient_accumulation_steps", None)
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{path}: remove the 'optimizer' / 'scheduler' blocks; pgm_dist builds torch's AdamW "
                          "and its schedule from --lr, --warmup-steps, --lr-schedule ...")
    per_step = cfg["train_micro_batch_size_per_gpu"] * world_size
    if cfg["train_batch_size"] % per_step:
        raise ConfigError(f"global batch {cfg['train_batch_size']} is not a multiple of micro-batch "
                          f"{cfg['train_micro_batch_size_per_gpu']} x {world_size} ranks; change "
                          "--global-batch or --micro-batch")
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.get("fp16", {}).get("enabled") and device.type == "cpu":
        raise ConfigError(f"{path} enables fp16, which the CPU does not support; use bf16 or fp32")
    stage = zero_stage(cfg)
    if bf16["enabled"] and stage < 1:
        raise ConfigError("bf16 needs ZeRO stage >= 1 (stage 0 would accumulate gradients in bf16)")
    if device.type == "cpu":
        cfg.get("zero_optimization", {}).get("offload_optimizer", {}).pop("pin_memory", None)
    return cfg
