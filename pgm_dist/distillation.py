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
resumes anywhere, at any world size, with the right teacher.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from pgm_dist.checkpoints.format import EMA_FILE, STATE_FILE
from pgm_dist.checkpoints.load import EXPORT_CONFIG, EXPORT_WEIGHTS, resolve_model_dir, training_data_folder
from pgm_dist.common.distributed import DistEnv
from pgm_dist.common.errors import ConfigError
from pgm_dist.common.seeding import sample_seed
from pgm_dist.models.config import ModelConfig
from pgm_dist.sdtt import DIVERGENCES, TEACHER_SOURCES, SDTTConfig, SDTTObjective
from pgm_dist.train_config import TrainConfig, _opt, parse_train_config
from pgm_dist.training import Setup, Task, prepare

DEFAULT_TEACHER = Path("runs/default")
INIT_SOURCES = ("auto", "raw", "ema")


@dataclass
class DistillConfig(TrainConfig):
    """TrainConfig's options (the model is the teacher's, so no ``--model``) and SDTT's."""

    cli_excluded: ClassVar[tuple[str, ...]] = ("model",)

    out: str = _opt("runs/distill", "run folder: checkpoints, TensorBoard logs, resolved config")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0: at the end of the last round, "
                             "rounds x round steps); a run stopped early resumes with a larger value or 0")
    lr: float = _opt(3e-4, "peak learning rate (the papers: 3e-4)")
    warmup_steps: int = _opt(10, "linear warm-up steps (the papers: 2500)")
    teacher: str | None = _opt(None, "the model to distil: a checkpoint, a run folder (its latest checkpoint) or "
                                     "an export (default: the latest checkpoint of runs/default)")
    init_from: str = _opt("auto", "the teacher's weights the student (and first teacher) start from: raw (fp32 "
                                  "master weights of a checkpoint, as the reference), ema, or auto (raw for a "
                                  "checkpoint, ema for an export, which holds only those)", choices=INIT_SOURCES)
    start_steps: int = _opt(64, "K0: the first teacher's sampling steps; dt starts at 1/K0 (the papers: 1024)")
    teacher_steps: int = _opt(2, "m: teacher steps matched by one student step; K0 must be m times a power of 2")
    round_steps: int = _opt(50, "optimizer steps per round (the papers: 10000)")
    rounds: int = _opt(3, "rounds; round r's student samples in K0 / (m 2^r) steps")
    min_steps: int = _opt(8, "stop before a round whose student would sample in fewer steps")
    divergence: str = _opt("kl-rev", "loss on the masked positions: reverse KL (student || teacher), forward KL, "
                                     "MSE of log-probabilities, total variation", choices=tuple(DIVERGENCES))
    teacher_source: str = _opt("raw", "the student weights that become the next teacher", choices=TEACHER_SOURCES)
    t_min: float = _opt(1e-5, "smallest noise level t drawn")
    reset_optimizer: bool = _opt(False, "at each round's start, restart Adam (moments and step count, as a fresh "
                                        "optimizer; the learning-rate schedule goes on); default: it continues")
    reset_ema: bool = _opt(False, "at each round's start, restart the EMA from the student's current weights, with "
                                  "its warm-up; default: it continues")
    eval_model: str | None = _opt(None, "a Hugging Face causal LM folder (pip install -e '.[eval]'): generative "
                                        "perplexity of the samples drawn at the end of each round")
    eval_samples: int = _opt(8, "sequences sampled with the EMA weights at the end of each round")

    def __post_init__(self) -> None:
        try:
            sdtt = self.sdtt
        except ValueError as err:
            raise ConfigError(str(err).replace("start steps", "--start-steps")) from None
        end = sdtt.num_rounds * sdtt.round_steps
        if self.max_steps == 0:
            self.max_steps = end
        elif self.max_steps > end:
            raise ConfigError(f"--max-steps {self.max_steps}: distillation ends at step {end} "
                              f"({sdtt.num_rounds} rounds of {sdtt.round_steps} steps)")
        if self.eval_samples < 1:
            raise ConfigError(f"--eval-samples must be at least 1, got {self.eval_samples}")
        super().__post_init__()

    @property
    def sdtt(self) -> SDTTConfig:
        return SDTTConfig(self.start_steps, self.teacher_steps, self.round_steps, self.rounds, self.min_steps,
                          self.divergence, self.teacher_source, self.t_min)


def parse_distill_config(argv: list[str] | None = None) -> DistillConfig:
    """``pgm_dist/distill.py``'s options (also the launcher's ``--entry distill``); argparse errors exit 2."""
    return parse_train_config(argv, DistillConfig, prog="deepspeed pgm_dist/distill.py",
                              description="Distil a trained model with SDTT (self-distillation through time).",
                              epilog=__doc__)


@dataclass
class Teacher:
    source: Path  # the export or checkpoint folder
    info: dict  # its config.json (export) or pgm_state.json (checkpoint)

    @property
    def is_export(self) -> bool:
        return (self.source / EXPORT_WEIGHTS).is_file()


def find_teacher(path: str | None) -> Teacher:
    """The checkpoint or export ``--teacher`` names, or the default run's latest checkpoint."""
    try:
        source = resolve_model_dir(path or DEFAULT_TEACHER)
    except FileNotFoundError as err:
        if path is None:
            raise ConfigError(f"no --teacher given and {DEFAULT_TEACHER} holds no complete checkpoint: train one "
                              "first with `deepspeed pgm_dist/train.py --ds_config ds_configs/zero2.json`, "
                              "or pass --teacher PATH") from None
        raise ConfigError(f"--teacher: {err}") from None
    info_file = source / (EXPORT_CONFIG if (source / EXPORT_WEIGHTS).is_file() else STATE_FILE)
    return Teacher(source, json.loads(info_file.read_text()))


def initial_weights(teacher: Teacher, init_from: str) -> dict[str, torch.Tensor]:
    """fp32 weights by parameter name: ``raw`` = the checkpoint's fp32 master weights (gathered
    from the ZeRO shards, exact also for a bf16 run), ``ema`` = its EMA (an export's weights)."""
    if init_from == "auto":
        init_from = "ema" if teacher.is_export else "raw"
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

    def __init__(self, cfg: DistillConfig, init: dict[str, torch.Tensor] | None, evaluator=None):
        self.cfg, self.init, self.evaluator = cfg, init, evaluator
        self.step_round = 0  # the round the latest optimizer step trained in (logged with its loss)

    def build(self, setup: Setup):
        model, _ = super().build(setup)
        if self.init is not None:  # a resumed run loads the student from its checkpoint instead
            model.load_state_dict(self.init)
        objective = SDTTObjective.from_student(model, self.cfg.sdtt)
        objective.teacher.to(setup.device)
        return model, objective

    def attach(self, loop, setup: Setup) -> None:
        engine = loop.p.engine
        objective: SDTTObjective = engine.objective

        def on_step(step: int) -> None:
            self.step_round = objective.round
            if not objective.round_ends_at(step):
                return
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
        round's step count; rank 0 logs speed, unigram entropy and (with ``--eval-model``) generative
        perplexity."""
        from pgm_dist.evaluation.gen_ppl import sample_quality

        engine, state = loop.p.engine, loop.state
        steps = engine.objective.sampling_steps(round_index)
        generator = torch.Generator(setup.device).manual_seed(sample_seed(self.cfg.seed, state.step))
        result = engine.sample_with_ema(lambda model: sample_quality(
            model, self.cfg.eval_samples, steps, generator, setup.tokenizer.decode, self.evaluator))
        if result is None:  # not rank 0
            return
        quality, texts = result
        values = {f"eval/{name}": value for name, value in quality.items()}
        loop.p.writer.scalars(values, state.step, state.tokens_seen)
        loop.p.writer.text("distill/sample", texts[0], state.step)
        tqdm.write(f"step {state.step}: end of round {round_index}, {steps}-step samples: "
                   + ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items()))


def prepare_distillation(cfg: DistillConfig, env: DistEnv, device: torch.device) -> Setup:
    """:func:`pgm_dist.training.prepare` with the teacher's model; raises every user error
    (teacher, data, evaluator) before any distributed work."""
    teacher = find_teacher(cfg.teacher)
    if cfg.data is None:  # the teacher's own data, as evaluate does
        trained_on = training_data_folder(teacher.info)
        if trained_on is not None and trained_on.is_dir():
            cfg = dataclasses.replace(cfg, data=str(trained_on))
    model_config = ModelConfig.from_dict(teacher.info["model_config"])
    if model_config.image_grid is not None:
        raise ConfigError(f"the teacher {teacher.source} is an image PGM: SDTT distillation here is for text PGMs")
    model_config.attention = cfg.attention
    model_config.loss_chunk, model_config.activation_checkpointing = cfg.loss_chunk, cfg.activation_checkpointing
    if cfg.dropout is not None:
        model_config.dropout = cfg.dropout
    setup = prepare(cfg, env, device, model_config)
    meta = setup.folder.meta
    if teacher.info["tokenizer_sha256"] != setup.tokenizer.sha256:
        raise ConfigError(f"the teacher {teacher.source} was trained with another tokenizer than the data "
                          f"{setup.folder.path} holds; pass --data with the teacher's data folder")
    if (model_config.seq_len, model_config.vocab_size) != (meta.seq_len, meta.vocab_size):
        raise ConfigError(f"the teacher {teacher.source} reads sequences of {model_config.seq_len} tokens over "
                          f"{model_config.vocab_size} ids, the data {setup.folder.path} has {meta.seq_len} and "
                          f"{meta.vocab_size}; pass --data with the teacher's data folder")
    init = None if setup.resume_from is not None else initial_weights(teacher, cfg.init_from)
    evaluator = None
    if cfg.eval_model is not None:
        from pgm_dist.evaluation.gen_ppl import load_evaluator

        if env.is_main:  # only rank 0 samples and scores; the others check the folder exists
            evaluator = load_evaluator(cfg.eval_model, device)
        elif not Path(cfg.eval_model).is_dir():
            raise ConfigError(f"--eval-model {cfg.eval_model}: no such folder")
    setup.task = DistillTask(setup.cfg, init, evaluator)
    if env.is_main:
        print(f"distilling {teacher.source} ({'export' if teacher.is_export else 'checkpoint'}): "
              f"{cfg.sdtt.num_rounds} rounds of {cfg.round_steps} steps, students at "
              + ", ".join(str(cfg.start_steps // (cfg.teacher_steps * 2**r)) for r in range(cfg.sdtt.num_rounds))
              + " sampling steps")
    return setup
