"""Training composition shared by every entry point: ``deepspeed pgm_dist/train.py``,
``deepspeed pgm_dist/distill.py`` (its own :class:`Task` and ``prepare``) and the SLURM
launcher's in-job task (:class:`pgm_dist.slurm_job.JobTask`, submitted by
``launcher/submit.py``) all end in :func:`prepare_process` then :func:`run`. Every error a
user can cause is raised by ``prepare`` before any distributed work starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import find_resume_checkpoint, read_state
from pgm_dist.checkpoints.universal import prepare_universal
from pgm_dist.common.cli import run_cli
from pgm_dist.common.distributed import DistEnv, dist_env, init_process_group, release_shared_memory, select_device
from pgm_dist.common.errors import ConfigError
from pgm_dist.common.files import write_json_atomic
from pgm_dist.common.seeding import sample_seed
from pgm_dist.common.zero import zero_stage
from pgm_dist.data.default import default_data
from pgm_dist.data.loader import TrainLoader, ValidationLoader
from pgm_dist.data.shards import DataFolder
from pgm_dist.data.tokenizer import Tokenizer
from pgm_dist.images.objective import ImageObjective
from pgm_dist.models import build_model
from pgm_dist.models.config import IMAGE_PRESETS, ModelConfig
from pgm_dist.objectives import MDLMObjective, PGMObjective
from pgm_dist.train_config import TrainConfig, resolve_ds_config


def objective_for(config):
    """The pre-training objective of a model config: PGM, MDLM, or (an image grid) the image one."""
    if config.image_grid is not None:
        if config.arch != "pgm" or not config.num_classes:
            raise ValueError("image training needs a class-conditional PGM (a pgm-img-* preset)")
        return ImageObjective(num_classes=config.num_classes)
    return PGMObjective() if config.arch == "pgm" else MDLMObjective(mask_id=config.mask_id)


class Task:
    """What :func:`run` trains: pre-training. Distillation (``pgm_dist/distillation.py``) overrides
    both methods and ends in the same :func:`run`."""

    def build(self, setup: "Setup") -> tuple[torch.nn.Module, object]:
        """The model to train, weights initialised, and its objective (before DeepSpeed)."""
        return build_model(setup.model_config), objective_for(setup.model_config)

    def attach(self, loop, setup: "Setup") -> None:
        """Add hooks to ``loop.p`` (``LoopParts``) once the engine exists, before any restore."""


@dataclass
class Setup:
    """Everything decided before any distributed work."""
    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    folder: DataFolder
    tokenizer: Tokenizer | None  # None for image data (codes are decoded to pixels, not text)
    model_config: ModelConfig
    ds_config: dict
    train_loader: TrainLoader
    resume_from: Path | None
    universal: bool
    out: Path
    launch: dict = field(default_factory=dict)  # who started this process (SLURM job id, nodes), logged at start
    task: Task = field(default_factory=Task)


def codec_sha256(folder: DataFolder, tokenizer: Tokenizer | None) -> str:
    """What turns the data's ids into text or pictures, as a checksum a checkpoint records: the
    tokenizer's (text), or the image folder's grid, codebook, classes and VQ config."""
    if tokenizer is not None:
        return tokenizer.sha256
    return hashlib.sha256(json.dumps(folder.meta.image, sort_keys=True).encode()).hexdigest()


# How, not what, a model computes: a checkpoint resumes under other values of these.
VOLATILE_MODEL_FIELDS = ("attention", "preset_name", "loss_chunk", "activation_checkpointing")


def check_resume(checkpoint: Path, model_config: ModelConfig, folder: DataFolder, tokenizer: Tokenizer | None) -> dict:
    saved = read_state(checkpoint)
    if saved["tokenizer_sha256"] != codec_sha256(folder, tokenizer):
        what = f"the tokenizer of the data ({tokenizer.path})" if tokenizer else f"the image codes of {folder.path}"
        raise ConfigError(f"{what} does not match the one checkpoint {checkpoint} was trained with; "
                          "use the same data folder or --resume never")
    old, new = dict(saved["model_config"]), model_config.to_dict()
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
        preset_for_data(cfg, DataFolder.open(Path(cfg.data)))  # the data exists and suits --model
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
    options = {"attention": cfg.attention, "loss_chunk": cfg.loss_chunk,
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
    universal = False
    if resume_from is not None:
        saved = check_resume(resume_from, model_config, folder, tokenizer)
        stage = zero_stage(ds_config)
        universal = saved["world_size"] != env.world_size or saved["zero_stage"] != stage
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
    train_loader = TrainLoader(
        cfg.train_shards or folder.train_sources, seq_len=meta.seq_len,
        micro_batch=ds_config["train_micro_batch_size_per_gpu"], rank=env.rank, world_size=env.world_size,
        num_workers=cfg.loader_workers, seed=cfg.seed, shuffle_shards=cfg.shuffle_shards,
        samples_per_shard=None if cfg.train_shards else meta.samples_per_shard,
        pin_memory=device.type == "cuda", labels=folder.is_image)
    return Setup(cfg, env, device, folder, tokenizer, model_config, ds_config, train_loader, resume_from,
                 universal, out)


def _limit_cpu_threads(env: DistEnv, device: torch.device) -> None:
    """Ranks sharing a CPU must split its cores (the launchers do not set OMP_NUM_THREADS)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", env.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def run(setup: Setup) -> str:
    import deepspeed

    from pgm_dist.checkpoints.saver import Checkpointer
    from pgm_dist.common.zero import full_numel
    from pgm_dist.engine import Engine
    from pgm_dist.loop import LoopParts, TrainingLoop, TrainState
    from pgm_dist.metrics import make_writer
    from pgm_dist.sampling import generate

    deepspeed.utils.logger.setLevel(logging.WARNING)
    cfg, env, device = setup.cfg, setup.env, setup.device
    init_process_group(device)
    tag = None
    if setup.resume_from is not None:
        tag = prepare_universal(setup.resume_from, env) if setup.universal else setup.resume_from.name
    torch.manual_seed(cfg.seed)
    model, objective = setup.task.build(setup)
    engine = Engine(model, objective, cfg, setup.ds_config, env, device)
    stage = zero_stage(setup.ds_config)
    folder = setup.folder
    has_val = any(folder.path.glob("val-*.tar"))

    def val_batches():
        if not has_val:
            return []
        return ValidationLoader(folder.val_sources, seq_len=folder.meta.seq_len, micro_batch=engine.micro_batch,
                                rank=env.rank, world_size=env.world_size, max_batches=cfg.eval_batches,
                                labels=folder.is_image)

    def sample_texts(model, step: int) -> list[str]:
        generator = torch.Generator(device).manual_seed(sample_seed(cfg.seed, step))
        tokens = generate(model, cfg.num_samples, cfg.sample_steps, generator=generator)
        return [setup.tokenizer.decode(row.tolist()) for row in tokens]

    sample = sample_texts
    if folder.is_image:
        from pgm_dist.images.pictures import grid_array, pixel_decoder, sample_pictures, save_grid

        decode = pixel_decoder(folder.vq_path)
        classes = range(min(10, setup.model_config.num_classes))  # one row per class, at most 10

        def sample(model, step: int):
            """A grid of ``--num-samples`` pictures of each class: uint8 [H, W, 3] for TensorBoard,
            and OUT/samples/step_XXXXXXXX.png."""
            generator = torch.Generator(device).manual_seed(sample_seed(cfg.seed, step))
            pixels = sample_pictures(model, classes, cfg.num_samples, cfg.sample_steps, decode,
                                     cfg=cfg.sample_cfg, generator=generator)
            scale = max(1, 64 // pixels.shape[2])  # small grids (digits' 8x8) drawn larger
            if env.is_main:
                save_grid(pixels, setup.out / "samples" / f"step_{step:08d}.png", scale=scale)
            return grid_array(pixels, scale=scale)

    def checkpoint_state(state) -> dict:
        return {"step": state.step, "train_state": state.state_dict(), "world_size": env.world_size,
                "zero_stage": stage, "model_config": setup.model_config.to_dict(), "train_config": cfg.to_dict(),
                "tokenizer_sha256": codec_sha256(folder, setup.tokenizer), "data_meta": folder.meta.to_dict()}

    state = TrainState()
    checkpointer = Checkpointer(setup.out / "checkpoints", env, cfg.keep_last, cfg.ckpt_every, cfg.ckpt_minutes)
    parts = LoopParts(engine, setup.train_loader, val_batches, checkpointer, None, sample,
                      checkpoint_state, setup.tokenizer.path if setup.tokenizer else None)
    loop = TrainingLoop(parts, state)
    setup.task.attach(loop, setup)
    if setup.resume_from is not None:
        _, client_state = engine.ds.load_checkpoint(str(setup.resume_from.parent), tag=tag,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        loop.restore(client_state, setup.resume_from)
        state.restarts += 1
        if env.is_main:
            print(f"resumed from {setup.resume_from} at step {state.step}")
    parts.writer = make_writer(env.is_main, setup.out / "tb", state.step, state.tokens_seen)
    # Every (re)start: where it runs, so a requeued or resized job is visible in TensorBoard.
    parts.writer.text("run/start", f"job {setup.launch.get('job_id', '-')} on {setup.launch.get('nodes', '-')}: "
                                   f"world size {env.world_size}, restart {state.restarts}, step {state.step}",
                      state.step)
    parts.writer.scalars({"run/world_size": env.world_size, "run/restarts": state.restarts,
                          "run/nodes": setup.launch.get("num_nodes")}, state.step, state.tokens_seen)
    memory = engine.model_state_bytes()
    if env.is_main:
        setup.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(setup.out / "config.json", {
            "train": cfg.to_dict(), "model": setup.model_config.to_dict(), "ds_config": setup.ds_config,
            "data": str(folder.path), "world_size": env.world_size,
            "batch": {"global": engine.global_batch, "micro": engine.micro_batch, "accumulation": engine.accum},
            "model_state_bytes_per_rank": memory})
        print(f"training {setup.model_config.preset_name} ({sum(map(full_numel, model.parameters())) / 1e6:.1f}M "
              f"parameters) on {folder.path} for {cfg.max_steps} steps: global batch {engine.global_batch} = "
              f"{engine.micro_batch} x {env.world_size} ranks x {engine.accum} accumulation, "
              f"{'bf16' if setup.ds_config['bf16']['enabled'] else 'fp32'}, ZeRO-{stage}, {device}; model states "
              f"per rank {memory['total'] / 2**20:.1f} MiB (parameters {memory['params'] / 2**20:.1f}, gradients "
              f"{memory['grads'] / 2**20:.1f}, optimizer {memory['optimizer'] / 2**20:.1f})")
    try:
        status = loop.run()
    finally:
        parts.writer.close()
    release_shared_memory(env)
    if env.is_main:
        print(f"\n{status} at step {state.step}.")
        for i, text in enumerate(loop.last_texts):
            print(f"--- sample {i} (EMA weights, {cfg.sample_steps} steps) ---\n{text[:600]}")
        if folder.is_image:
            print(f"sample pictures (EMA weights, {cfg.sample_steps} steps, guidance {cfg.sample_cfg}): "
                  f"{setup.out / 'samples'}")
        print(f"\nTensorBoard logs: {setup.out / 'tb'}   (tensorboard --logdir {setup.out / 'tb'})")
        print(f"checkpoints:      {setup.out / 'checkpoints'}")
    return status




def launch(cfg: TrainConfig, prepare=prepare) -> int:
    """A ``deepspeed`` entry's body after parsing: exit status 2 with the message on a user error
    (every one is raised while preparing, before any distributed work)."""
    prepared = []
    status = run_cli(lambda: prepared.append(prepare_process(cfg, prepare)))
    if prepared:
        run(prepared[0])
    return status


def prepare_process(cfg: TrainConfig, prepare=prepare) -> Setup:
    """This process's rank, device and CPU threads, then ``prepare`` (:func:`prepare`, or
    distillation's) (raises ``USER_ERRORS``)."""
    env = dist_env()
    device = select_device(env)
    _limit_cpu_threads(env, device)
    return prepare(cfg, env, device)
