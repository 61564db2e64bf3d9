"""Training composition shared by every entry point: ``deepspeed pgm_dist/train.py``,
``deepspeed pgm_dist/distill.py`` (its own :class:`Task` and ``prepare``) and the SLURM
launcher's in-job task (:class:`pgm_dist.cluster.job.JobTask`, submitted by
``launcher/submit.py``) all end in :func:`prepare_process` then :func:`run`. Every error a
user can cause is raised by ``prepare`` before any distributed work starts."""
from __future__ import annotations

import json
import logging
import shlex
import socket
import sys
from pathlib import Path

import torch

from pgm_dist.checkpoints.format import find_resume_checkpoint
from pgm_dist.checkpoints.saver import Checkpointer
from pgm_dist.checkpoints.universal import prepare_universal
from pgm_dist.common.cli import run_cli
from pgm_dist.common.distributed import broadcast_object, init_process_group, release_shared_memory
from pgm_dist.common.errors import UserError
from pgm_dist.common.files import no_group_or_world_write, write_json_atomic
from pgm_dist.common.provenance import code_change, code_version
from pgm_dist.common.seeding import sample_seed
from pgm_dist.common.zero import full_numel, zero_stage
from pgm_dist.data.loader import ValidationLoader
from pgm_dist.images.pictures import grid_array, pixel_decoder, sample_pictures, save_grid
from pgm_dist.sampling import generate
from pgm_dist.training.components import Setup
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.engine import Engine
from pgm_dist.training.lease import RunFolderBusy, release_lease, take_lease
from pgm_dist.training.loop import LoopParts, TrainingLoop, TrainState
from pgm_dist.training.setup import codec_sha256, prepare, prepare_process, with_resume
from pgm_dist.training.writer import make_writer


def run(setup: Setup) -> str:
    """Train (or distil) what ``setup`` describes: build -> restore -> announce -> loop -> summarize.
    Returns how the loop ended ("finished", "preempted", ...)."""
    # DeepSpeed is imported when a run starts, not with this module: the launcher reads this
    # module on the login node, where importing DeepSpeed costs seconds and prints its
    # accelerator warning on stdout (tests/unit/cluster/test_job_alias.py checks).
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    init_process_group(setup.device, setup.cfg.dist_timeout_min)
    setup = agree_on_start(setup)
    loop = build_loop(setup)
    restore(loop, setup)
    announce(loop, setup)
    try:
        status = loop.run()
    finally:
        loop.p.writer.close()
    release_shared_memory(setup.env)
    if status == "finished" and setup.env.is_main:
        release_lease(setup.out)
    summarize(loop, setup, status)
    return status


def agree_on_start(setup: Setup) -> Setup:
    """Collective, first thing after the process group starts: rank 0 takes the run folder's lease
    (:mod:`pgm_dist.training.lease`), then lists the checkpoints once more; every rank resumes from
    rank 0's choice, never from its own listing (a checkpoint completing meanwhile, or a file system
    that shows it late). Raises the same :class:`UserError` on every rank when rank 0 refuses (another
    live job holds the folder)."""
    env = setup.env
    verdict = None
    if env.is_main:
        try:
            take_lease(setup.out)
            chosen = find_resume_checkpoint(setup.cfg.resume, setup.out / "checkpoints")
            verdict = {"resume": None if chosen is None else str(chosen)}
        except UserError as err:
            verdict = {"refused": str(err), "busy": isinstance(err, RunFolderBusy)}
    verdict = broadcast_object(verdict)
    if "refused" in verdict:
        raise (RunFolderBusy if verdict["busy"] else UserError)(verdict["refused"])
    chosen = None if verdict["resume"] is None else Path(verdict["resume"])
    if chosen == setup.resume_from:
        return setup
    print(f"rank {env.rank}: resuming from {chosen or 'the start'}, rank 0's choice (this rank found "
          f"{setup.resume_from or 'no checkpoint'})", file=sys.stderr, flush=True)
    return with_resume(setup, chosen)


def build_loop(setup: Setup) -> TrainingLoop:
    """The model and objective (the task's), the DeepSpeed engine and the loop around it, with the
    task's hooks attached; nothing restored yet."""
    cfg, env = setup.cfg, setup.env
    torch.manual_seed(cfg.seed)
    model, objective = setup.task.build(setup)
    engine = Engine(model, objective, cfg, setup.ds_config, env, setup.device)
    checkpointer = Checkpointer(setup.out / "checkpoints", env, cfg.keep_last, cfg.ckpt_every, cfg.ckpt_minutes)
    parts = LoopParts(engine, setup.train_loader, lambda: validation_batches(setup, engine.micro_batch),
                      checkpointer, None, sampler(setup), lambda state: checkpoint_state(setup, state),
                      setup.tokenizer.path if setup.tokenizer else None)
    loop = TrainingLoop(parts, TrainState())
    loop.save_budget_s = setup.launch.get("signal_delay_s")
    setup.task.attach(loop, setup)
    return loop


def validation_batches(setup: Setup, micro_batch: int):
    """This rank's validation batches of one evaluation (none when the data has no val shards)."""
    folder, env = setup.folder, setup.env
    if not any(folder.path.glob("val-*.tar")):
        return []
    return ValidationLoader(folder.val_sources, seq_len=folder.meta.seq_len, micro_batch=micro_batch,
                            rank=env.rank, world_size=env.world_size, max_batches=setup.cfg.eval_batches,
                            labels=folder.is_image)


def sampler(setup: Setup):
    """``sample(model, step)``: the run's sample texts, or (image data) a picture grid per class:
    uint8 [H, W, 3] for TensorBoard, also written to OUT/samples/step_XXXXXXXX.png."""
    cfg, device = setup.cfg, setup.device
    if not setup.folder.is_image:
        def sample_texts(model, step: int) -> list[str]:
            generator = torch.Generator(device).manual_seed(sample_seed(cfg.seed, step))
            tokens = generate(model, cfg.num_samples, cfg.sample_steps, generator=generator)
            return [setup.tokenizer.decode(row.tolist()) for row in tokens]
        return sample_texts

    decode = pixel_decoder(setup.folder.vq_path, setup.device)
    classes = range(min(10, setup.model_config.num_classes))  # one row per class, at most 10

    def sample_grid(model, step: int):
        generator = torch.Generator(device).manual_seed(sample_seed(cfg.seed, step))
        pixels = sample_pictures(model, classes, cfg.num_samples, cfg.sample_steps, decode,
                                 cfg=cfg.sample_cfg, generator=generator)
        scale = max(1, 64 // pixels.shape[2])  # small grids (digits' 8x8) drawn larger
        if setup.env.is_main:
            save_grid(pixels, setup.out / "samples" / f"step_{step:08d}.png", scale=scale)
        return grid_array(pixels, scale=scale)
    return sample_grid


def checkpoint_state(setup: Setup, state: TrainState) -> dict:
    """What ``pgm_state.json`` records beside DeepSpeed's files (see :mod:`pgm_dist.checkpoints.format`)."""
    return {"step": state.step, "train_state": state.state_dict(), "world_size": setup.env.world_size,
            "zero_stage": zero_stage(setup.ds_config), "model_config": setup.model_config.to_dict(),
            "train_config": setup.cfg.to_dict(), "tokenizer_sha256": codec_sha256(setup.folder, setup.tokenizer),
            "data_meta": setup.folder.meta.to_dict()}


def restore(loop: TrainingLoop, setup: Setup) -> None:
    """Load the checkpoint ``setup`` resumes from (a universal one at another world size or stage),
    then open the TensorBoard writer at the restored step."""
    state, env = loop.state, setup.env
    if setup.resume_from is not None:
        tag = prepare_universal(setup.resume_from, env) if setup.universal else setup.resume_from.name
        _, client_state = loop.p.engine.ds.load_checkpoint(str(setup.resume_from.parent), tag=tag,
                                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        loop.restore(client_state, setup.resume_from)
        state.restarts += 1
        if env.is_main:
            print(f"resumed from {setup.resume_from} at step {state.step}")
    loop.p.writer = make_writer(env.is_main, setup.out / "tb", state.step, state.tokens_seen)


def announce(loop: TrainingLoop, setup: Setup) -> None:
    """Every (re)start: where it runs in TensorBoard (so a requeued or resized job is visible), the
    resolved configuration in OUT/config.json and one line on the console."""
    cfg, env, state, engine, writer = setup.cfg, setup.env, loop.state, loop.p.engine, loop.p.writer
    writer.text("run/start", run_card(setup, state), state.step)
    writer.scalars({"run/world_size": env.world_size, "run/restarts": state.restarts,
                    "run/nodes": setup.launch.get("num_nodes")}, state.step, state.tokens_seen)
    memory = engine.model_state_bytes()
    if not env.is_main:
        return
    setup.out.mkdir(parents=True, exist_ok=True)
    code = code_version()
    previous = setup.out / "config.json"
    if previous.is_file() and (warning := code_change(json.loads(previous.read_text()).get("code"), code)):
        print(warning)
    write_json_atomic(setup.out / "config.json", {
        "code": code, "train": cfg.to_dict(), "model": setup.model_config.to_dict(), "ds_config": setup.ds_config,
        "data": str(setup.folder.path), "world_size": env.world_size,
        "batch": {"global": engine.global_batch, "micro": engine.micro_batch, "accumulation": engine.accum},
        "model_state_bytes_per_rank": memory})
    parameters = sum(map(full_numel, engine.ds.module.parameters()))
    print(f"training {setup.model_config.preset_name} ({parameters / 1e6:.1f}M parameters) on {setup.folder.path} "
          f"for {cfg.max_steps} steps: global batch {engine.global_batch} = {engine.micro_batch} x "
          f"{env.world_size} ranks x {engine.accum} accumulation, "
          f"{'bf16' if setup.ds_config['bf16']['enabled'] else 'fp32'}, ZeRO-{zero_stage(setup.ds_config)}, "
          f"{setup.device}; model states per rank {memory['total'] / 2**20:.1f} MiB (parameters "
          f"{memory['params'] / 2**20:.1f}, gradients {memory['grads'] / 2**20:.1f}, optimizer "
          f"{memory['optimizer'] / 2**20:.1f})")


def run_card(setup: Setup, state: TrainState) -> str:
    """What TensorBoard's ``run/start`` shows for each (re)start: where it runs (the launcher's job and
    nodes, else a local run and its host), world size, restart and step, the devices, the command
    and the code; nothing that is not known."""
    launch, env = setup.launch, setup.env
    where = (f"job {launch['job_id']} on {launch.get('nodes') or socket.gethostname()}" if launch.get("job_id")
             else f"local run on {socket.gethostname()}")
    device = setup.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"{where}: world size {env.world_size}, restart {state.restarts}, step {state.step}",
             f"devices: {env.world_size} x {device.type} ({name})",
             f"command: {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"]
    code = code_version()
    if code:
        lines.append(f"code: git {code['commit'][:12]}" + (" with uncommitted changes" if code["dirty"] else ""))
    return "\n".join(lines)


def summarize(loop: TrainingLoop, setup: Setup, status: str) -> None:
    """Rank 0: how the run ended, the last samples, where the logs and checkpoints are."""
    if not setup.env.is_main:
        return
    cfg, out = setup.cfg, setup.out
    print(f"\n{status} at step {loop.state.step}.")
    for i, text in enumerate(loop.last_texts):
        print(f"--- sample {i} (EMA weights, {cfg.sample_steps} steps) ---\n{text[:600]}")
    if setup.folder.is_image:
        print(f"sample pictures (EMA weights, {cfg.sample_steps} steps, guidance {cfg.sample_cfg}): {out / 'samples'}")
    print(f"\nTensorBoard logs: {out / 'tb'}   (tensorboard --logdir {out / 'tb'})")
    print(f"checkpoints:      {out / 'checkpoints'}")


def launch(cfg: TrainConfig, prepare=prepare) -> int:
    """A ``deepspeed`` entry's body after parsing: exit status 2 with the message on a user error
    (every one is raised while preparing, before any distributed work)."""
    no_group_or_world_write()
    prepared = []
    status = run_cli(lambda: prepared.append(prepare_process(cfg, prepare)))
    if prepared:
        try:
            run(prepared[0])
        except UserError as err:  # found once the process group started (agree_on_start), on every rank
            print(f"error: {err}", file=sys.stderr)
            return 2
    return status

