"""SDTT distillation (section 8 of docs/pgm-algorithm.md) on the training engine, loop and
checkpoint format: ``deepspeed pgm_dist/distill.py --ds_config ds_configs/zero2.json --teacher PATH``.

The student starts from a trained model (a checkpoint, run folder or export) and learns to
do in one sampling step what its frozen teacher does in ``--teacher-steps`` steps. Every
``--round-steps`` optimizer steps the student becomes the teacher and its sampling steps
halve: from ``--start-steps / --teacher-steps`` down to ``--min-steps``. The defaults are a
CPU quick start on the default training run (students at 32, 16 and 8 steps); the papers:
``--start-steps 1024 --round-steps 10000 --rounds 7 --warmup-steps 2500 --ema-decay 0.9999``
with a global batch of 128.

Every checkpoint holds the round, ``dt`` and the teacher (``teacher.safetensors``), so a run
resumes anywhere, at any world size, with the right teacher."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from pgm_dist.checkpoints.load import training_data_folder
from pgm_dist.common.distributed import DistEnv
from pgm_dist.common.errors import ConfigError
from pgm_dist.common.seeding import sample_seed
from pgm_dist.data.shards import DataFolder
from pgm_dist.data.synthetic import SOURCE_FILE, MarkovSource
from pgm_dist.distillation.config import DistillConfig
from pgm_dist.distillation.objective import SDTTObjective
from pgm_dist.distillation.teacher import check_teacher_data, find_teacher, initial_weights
from pgm_dist.evaluation.gen_ppl import eval_samplers, load_evaluator, sample_quality
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.components import Setup, Task
from pgm_dist.training.setup import prepare


def student_weights(engine, source: str) -> dict[str, torch.Tensor]:
    """The student's whole fp32 weights by name: ``raw`` from the optimizer's fp32 master copy (the
    module holds bf16 copies in a bf16 run), ``ema`` the EMA's; collective under ZeRO (every rank calls it)."""
    if source == "ema":
        return engine.ema.whole()
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without a ZeRO / bf16 optimizer: the module is the master
        weights[name] = (p.detach() if full is None else full).float()
    return weights


@torch.no_grad()
def reset_adam(engine) -> None:
    """Zero Adam's moments and step counts in place: the next step is a fresh optimizer's first
    (bias corrections included). In place rather than clearing ``state``, so that a checkpoint
    saved right after still has the layout ZeRO's (and the universal) loader expects."""
    for state in engine.torch_optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            else:
                state[key] = type(value)(0)


class DistillTask(Task):
    """The student from the teacher's weights, the SDTT objective, and the round hooks."""

    def __init__(self, cfg: DistillConfig, init: dict[str, torch.Tensor] | None, evaluator=None, source=None):
        self.cfg, self.init, self.evaluator = cfg, init, evaluator
        self.source = source  # a synthetic folder's Markov source: the round-end samples' exact NLL
        self.step_round = 0  # the round the latest optimizer step trained in (logged with its loss)

    def build(self, setup: Setup):
        model, _ = super().build(setup)
        if self.init is not None:  # a resumed run loads the student from its checkpoint instead
            model.load_state_dict(self.init)
        objective = SDTTObjective.from_student(model, self.cfg.sdtt)
        objective.teacher.to(setup.device)
        precision = self.cfg.teacher_precision
        objective.teacher_autocast = precision == "bf16" or (precision == "auto" and setup.ds_config["bf16"]["enabled"])
        return model, objective

    def attach(self, loop, setup: Setup) -> None:
        engine = loop.p.engine
        objective: SDTTObjective = engine.objective

        def on_step(step: int) -> None:
            self.step_round = objective.round
            if not objective.round_ends_at(step):
                return
            if not loop.stop_requested():  # a stop signal's save must not wait for the round's samples
                self.evaluate_round(loop, setup, objective.round)
            if not objective.maybe_advance(step, lambda source: student_weights(engine, source)):
                return
            # Here and only here: the step's checkpoint (saved after this hook) holds the reset state and
            # the new round, so a resumed run never crosses this boundary again.
            if self.cfg.reset_optimizer:
                reset_adam(engine)
            if self.cfg.reset_ema:
                engine.ema.reset(engine.module)
            if setup.env.is_main:
                tqdm.write(f"step {step}: round {objective.round} starts, teacher <- student "
                           f"({self.cfg.teacher_source} weights), the student now learns "
                           f"{objective.sampling_steps()}-step sampling")

        loop.p.on_step = on_step
        loop.p.extra_scalars = lambda values: {
            "distill/loss": values["train/loss"], "distill/round": self.step_round,
            "distill/sampling_steps": objective.sampling_steps(self.step_round)}

    def evaluate_round(self, loop, setup: Setup, round_index: int) -> None:
        """Rank 0 (every rank under ZeRO-3, with the same generator): sample with the EMA weights at the
        round's step count, with each sampler of ``--eval-sampler``; rank 0 logs speed, unigram entropy
        and (with ``--eval-model``) generative perplexity (first-window protocol) as
        ``eval/SAMPLER/NAME``."""

        engine, state = loop.p.engine, loop.state
        steps = engine.objective.sampling_steps(round_index)
        samplers = eval_samplers(self.cfg.eval_sampler, setup.model_config.arch)
        for sampler in samplers:
            generator = torch.Generator(setup.device).manual_seed(sample_seed(self.cfg.seed, state.step))
            result = engine.sample_with_ema(lambda model, sampler=sampler: sample_quality(
                model, self.cfg.eval_samples, steps, generator, setup.tokenizer.decode, self.evaluator, sampler,
                source=self.source))
            if result is None:  # not rank 0
                continue
            quality, texts = result
            values = {f"eval/{sampler}/{name}": value for name, value in quality.items()}
            loop.p.writer.scalars(values, state.step, state.tokens_seen)
            loop.p.writer.text(f"distill/sample/{sampler}", texts[0], state.step)
            tqdm.write(f"step {state.step}: end of round {round_index}, {steps}-step samples ({sampler}): "
                       + ", ".join(f"{k.rsplit('/', 1)[1]} {v:.4g}" for k, v in values.items()))


def prepare_distillation(cfg: DistillConfig, env: DistEnv, device: torch.device) -> Setup:
    """:func:`pgm_dist.training.setup.prepare` with the teacher's model; raises every user error
    (teacher, data, evaluator) before any distributed work."""
    teacher = find_teacher(cfg.teacher)
    if cfg.data is None:  # the teacher's own data, as evaluate does
        trained_on = training_data_folder(teacher.info)
        if trained_on is not None and trained_on.is_dir():
            cfg = dataclasses.replace(cfg, data=str(trained_on))
    model_config = ModelConfig.from_dict(teacher.info["model_config"])
    if model_config.image_grid is not None:
        raise ConfigError(f"the teacher {teacher.source} is an image PGM: SDTT distillation here is for text PGMs")
    check_teacher_data(teacher, cfg.data)
    if teacher.is_reference:  # it reads any length (rotary) and takes the data's tokenizer and its BOS/EOS
        data = DataFolder.open(cfg.data)
        model_config.seq_len = data.meta.seq_len
        model_config.bos_id, model_config.eos_id = data.meta.special_ids["bos"], data.meta.special_ids["eos"]
    model_config.attention = cfg.attention
    model_config.loss_chunk, model_config.activation_checkpointing = cfg.loss_chunk, cfg.activation_checkpointing
    model_config.fused_loss = cfg.fused_loss
    if cfg.dropout is not None:
        model_config.dropout = cfg.dropout
    setup = prepare(cfg, env, device, model_config)
    meta = setup.folder.meta
    if not teacher.is_reference and teacher.info["tokenizer_sha256"] != setup.tokenizer.sha256:
        raise ConfigError(f"the teacher {teacher.source} was trained with another tokenizer than the data "
                          f"{setup.folder.path} holds; pass --data with the teacher's data folder")
    if (model_config.seq_len, model_config.vocab_size) != (meta.seq_len, meta.vocab_size):
        raise ConfigError(f"the teacher {teacher.source} reads sequences of {model_config.seq_len} tokens over "
                          f"{model_config.vocab_size} ids, the data {setup.folder.path} has {meta.seq_len} and "
                          f"{meta.vocab_size}; pass --data with the teacher's data folder")
    init = None if setup.resume_from is not None else initial_weights(teacher, cfg.init_from)
    evaluator = None
    if cfg.eval_model is not None:
        if env.is_main:  # only rank 0 samples and scores; the others check the folder exists
            evaluator = load_evaluator(cfg.eval_model, device)
        elif not Path(cfg.eval_model).is_dir():
            raise ConfigError(f"--eval-model {cfg.eval_model}: no such folder")
    source = MarkovSource.load(setup.folder.path / SOURCE_FILE) if setup.folder.meta.synthetic else None
    setup.task = DistillTask(setup.cfg, init, evaluator, source)
    if env.is_main:
        print(f"distilling {teacher.source} ({'export' if teacher.is_export else 'checkpoint'}): "
              f"{cfg.sdtt.num_rounds} rounds of {cfg.round_steps} steps, students at "
              + ", ".join(str(cfg.start_steps // (cfg.teacher_steps * 2**r)) for r in range(cfg.sdtt.num_rounds))
              + " sampling steps")
    return setup

