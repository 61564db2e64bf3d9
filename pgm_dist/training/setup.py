"""Everything decided before any distributed work: the data, the model config, the DeepSpeed config,
the checkpoint to resume from. Every error a user can cause is raised here."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import find_resume_checkpoint, read_state
from pgm_dist.common.distributed import DistEnv, dist_env, select_device
from pgm_dist.common.errors import ConfigError, DataError
from pgm_dist.common.zero import zero_stage
from pgm_dist.data.default import default_data
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder
from pgm_dist.data.tokenizer import Tokenizer
from pgm_dist.models.config import IMAGE_PRESETS, ModelConfig
from pgm_dist.training.components import Setup
from pgm_dist.training.config import TrainConfig, resolve_ds_config


def codec_sha256(folder: DataFolder, tokenizer: Tokenizer | None) -> str:
    """What turns the data's ids into text or pictures, as a checksum a checkpoint records: the
    tokenizer's (text), or the image folder's grid, codebook, classes and VQ config."""
    if tokenizer is not None:
        return tokenizer.sha256
    return hashlib.sha256(json.dumps(folder.meta.image, sort_keys=True).encode()).hexdigest()


# How, not what, a model computes: a checkpoint resumes under other values of these.
VOLATILE_MODEL_FIELDS = ("attention", "preset_name", "loss_chunk", "fused_loss", "activation_checkpointing")


# What a run takes from the checkpoint it resumes: fields whose default changed since (an image run
# started before register_order existed goes on with its own, "legacy", order).
INHERITED_MODEL_FIELDS = ("register_order",)


def check_resume(checkpoint: Path, model_config: ModelConfig, folder: DataFolder, tokenizer: Tokenizer | None) -> dict:
    """Refuse a checkpoint of other data or another model; ``model_config`` takes the checkpoint's
    :data:`INHERITED_MODEL_FIELDS` first."""
    saved = read_state(checkpoint)
    for name in INHERITED_MODEL_FIELDS:
        setattr(model_config, name, getattr(ModelConfig.from_dict(saved["model_config"]), name))
    if saved["tokenizer_sha256"] != codec_sha256(folder, tokenizer):
        what = f"the tokenizer of the data ({tokenizer.path})" if tokenizer else f"the image codes of {folder.path}"
        raise ConfigError(f"{what} does not match the one checkpoint {checkpoint} was trained with; "
                          "use the same data folder or --resume never")
    # through ModelConfig: a field added since the checkpoint was written takes its default
    old, new = ModelConfig.from_dict(saved["model_config"]).to_dict(), model_config.to_dict()
    for volatile in VOLATILE_MODEL_FIELDS:
        old.pop(volatile, None), new.pop(volatile, None)
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        raise ConfigError(f"checkpoint {checkpoint} holds another model (checkpoint vs run: {diff}); "
                          "pass the same --model and data, or --resume never")
    return saved


def run_ds_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    return resolve_ds_config(cfg.ds_config, world_size=world_size, device=device,
                             micro_batch=cfg.micro_batch, global_batch=cfg.global_batch)


def allowed_world_sizes(global_batch: int, micro_batch: int) -> list[int]:
    """World sizes W that keep the global batch: global = micro x W x accumulation."""
    return [w for w in range(1, global_batch // micro_batch + 1) if global_batch % (micro_batch * w) == 0]


def check_before_launch(cfg: TrainConfig, world_sizes: list[int], device: torch.device) -> None:
    """What :func:`prepare` would reject at any of ``world_sizes``, checked where the job is submitted
    (raises ``USER_ERRORS``; starts nothing)."""
    if cfg.data:
        folder = DataFolder.open(Path(cfg.data))
        preset_for_data(cfg, folder)  # the data exists and suits --model
        if not cfg.train_shards:  # the loader's own rule (TrainLoader), for the largest world size
            shards, needed = folder.meta.train.shards, max(world_sizes) * max(cfg.loader_workers, 1)
            if shards < needed:
                raise DataError(f"{folder.path} has {shards} train shards; the job may get {max(world_sizes)} ranks "
                                f"x {max(cfg.loader_workers, 1)} loader workers, which need at least {needed}: "
                                "rebuild with a smaller --samples-per-shard, use fewer loader workers or nodes")
    ds_config = run_ds_config(cfg, 1, device)
    batch, micro = ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"]
    allowed = allowed_world_sizes(batch, micro)
    if not set(world_sizes) <= set(allowed):
        raise ConfigError(f"global batch {batch} with micro-batch {micro} allows world sizes "
                          f"{', '.join(map(str, allowed))}; the job may get {', '.join(map(str, world_sizes))}: "
                          "change --global-batch / --micro-batch or the node range")


def preset_for_data(cfg: TrainConfig, folder: DataFolder) -> ModelConfig:
    """The ``--model`` preset at the data's vocabulary and length (and, for an image folder, its
    grid and classes), with the run's model options."""
    meta = folder.meta
    options = {"attention": cfg.attention, "loss_chunk": cfg.loss_chunk, "fused_loss": cfg.fused_loss,
               "activation_checkpointing": cfg.activation_checkpointing}
    if cfg.dropout is not None:
        options["dropout"] = cfg.dropout
    if folder.is_image != (cfg.model in IMAGE_PRESETS):
        raise ConfigError(f"{folder.path} is an image folder: train an image preset ({', '.join(IMAGE_PRESETS)})"
                          if folder.is_image else
                          f"--model {cfg.model} is an image preset: give it an image data folder "
                          "(python -m pgm_dist.data build-images)")
    if folder.is_image:
        bos = meta.special_ids["bos"]
        return ModelConfig.preset(cfg.model, vocab_size=meta.vocab_size, seq_len=meta.seq_len, bos_id=bos,
                                  eos_id=bos, num_classes=meta.image["num_classes"], image_grid=meta.image["grid"],
                                  **options)
    return ModelConfig.preset(cfg.model, vocab_size=meta.vocab_size, seq_len=meta.seq_len,
                              bos_id=meta.special_ids["bos"], eos_id=meta.special_ids["eos"], **options)


def prepare(cfg: TrainConfig, env: DistEnv, device: torch.device, model_config: ModelConfig | None = None) -> Setup:
    """``model_config``: default the ``--model`` preset at the data's vocabulary and length."""
    data_path = Path(cfg.data) if cfg.data else default_data(env)
    folder = DataFolder.open(data_path)
    meta = folder.meta
    tokenizer = None if folder.is_image else Tokenizer(folder.tokenizer_path)
    model_config = model_config or preset_for_data(cfg, folder)
    out = Path(cfg.out)
    resume_from = find_resume_checkpoint(cfg.resume, out / "checkpoints")
    ds_config = run_ds_config(cfg, env.world_size, device)
    universal = resume_plan(resume_from, model_config, folder, tokenizer, env, ds_config)
    train_loader = TrainLoader(
        cfg.train_shards or folder.train_sources, seq_len=meta.seq_len,
        micro_batch=ds_config["train_micro_batch_size_per_gpu"], rank=env.rank, world_size=env.world_size,
        num_workers=cfg.loader_workers, seed=cfg.seed, shuffle_shards=cfg.shuffle_shards,
        samples_per_shard=None if cfg.train_shards else meta.samples_per_shard,
        pin_memory=device.type == "cuda", labels=folder.is_image)
    return Setup(cfg, env, device, folder, tokenizer, model_config, ds_config, train_loader, resume_from,
                 universal, out)


def resume_plan(resume_from: Path | None, model_config: ModelConfig, folder: DataFolder, tokenizer: Tokenizer | None,
                env: DistEnv, ds_config: dict) -> bool:
    """Check ``resume_from`` against the run; True when it must be loaded as a universal checkpoint
    (another world size or ZeRO stage), which ``ds_config`` is then set up for."""
    section = {k: v for k, v in ds_config.pop("checkpoint", {}).items() if k != "load_universal"}
    universal = False
    if resume_from is not None:
        saved = check_resume(resume_from, model_config, folder, tokenizer)
        universal = saved["world_size"] != env.world_size or saved["zero_stage"] != zero_stage(ds_config)
    if universal:
        section["load_universal"] = True
    if section:
        ds_config["checkpoint"] = section
    return universal


def with_resume(setup: Setup, resume_from: Path | None) -> Setup:
    """``setup`` resuming from ``resume_from`` instead (rank 0's choice, see ``training.session``)."""
    universal = resume_plan(resume_from, setup.model_config, setup.folder, setup.tokenizer, setup.env,
                            setup.ds_config)
    return dataclasses.replace(setup, resume_from=resume_from, universal=universal)


def _limit_cpu_threads(env: DistEnv, device: torch.device) -> None:
    """Ranks sharing a CPU must split its cores (the launchers do not set OMP_NUM_THREADS)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", env.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def prepare_process(cfg: TrainConfig, prepare=prepare) -> Setup:
    """This process's rank, device and CPU threads, then ``prepare`` (:func:`prepare`, or
    distillation's) (raises ``USER_ERRORS``)."""
    env = dist_env()
    device = select_device(env)
    _limit_cpu_threads(env, device)
    return prepare(cfg, env, device)

