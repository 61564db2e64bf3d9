"""The options of ``deepspeed pgm_dist/distill.py``: the training options plus SDTT's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pgm_dist.common.errors import ConfigError
from pgm_dist.distillation.objective import DIVERGENCES, TEACHER_SOURCES, SDTTConfig
from pgm_dist.training.config import TrainConfig, _opt, parse_train_config

_SDTT = SDTTConfig()  # the SDTT options' defaults: one set, SDTTConfig's
DEFAULT_TEACHER = Path("runs/default")


INIT_SOURCES = ("auto", "raw", "ema")
TEACHER_PRECISIONS = ("auto", "fp32", "bf16")
EVAL_SAMPLERS = ("both", "uniform", "binomial")


@dataclass
class DistillConfig(TrainConfig):
    """TrainConfig's options (the model is the teacher's, so no ``--model``) and SDTT's."""

    cli_excluded: ClassVar[tuple[str, ...]] = ("model",)

    out: str = _opt("runs/distill", "run folder: checkpoints, TensorBoard logs, resolved config")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0: at the end of the last round, "
                             "rounds x round steps); a run stopped early resumes with a larger value or 0")
    lr: float = _opt(3e-4, "peak learning rate (the papers: 3e-4)")
    warmup_steps: int = _opt(10, "linear warm-up steps (the papers: 2500)")
    teacher: str | None = _opt(None, "the model to distil: a checkpoint, a run folder (its latest checkpoint), "
                                     "an export, or a released reference .ckpt file (default: the latest "
                                     "checkpoint of runs/default)")
    init_from: str = _opt("auto", "the teacher's weights the student (and first teacher) start from: raw (fp32 "
                                  "master weights of a checkpoint, as the reference), ema, or auto (raw for a "
                                  "checkpoint or a released file, ema for an export, which holds only those)",
                          choices=INIT_SOURCES)
    start_steps: int = _opt(_SDTT.start_steps, "K0: the first teacher's sampling steps; dt starts at 1/K0 "
                                               "(the papers: 1024)")
    teacher_steps: int = _opt(_SDTT.teacher_steps, "m: teacher steps matched by one student step; K0 must be m "
                                                   "times a power of 2")
    round_steps: int = _opt(_SDTT.round_steps, "optimizer steps per round (the papers: 10000)")
    rounds: int = _opt(_SDTT.rounds, "rounds; round r's student samples in K0 / (m 2^r) steps")
    min_steps: int = _opt(_SDTT.min_steps, "stop before a round whose student would sample in fewer steps")
    divergence: str = _opt(_SDTT.divergence, "loss on the masked positions: reverse KL (student || teacher), "
                           "forward KL, MSE of log-probabilities, total variation", choices=tuple(DIVERGENCES))
    teacher_source: str = _opt(_SDTT.teacher_source, "the student weights that become the next teacher",
                               choices=TEACHER_SOURCES)
    t_min: float = _opt(_SDTT.t_min, "smallest noise level t drawn")
    reset_optimizer: bool = _opt(False, "at each round's start, restart Adam (moments and step count, as a fresh "
                                        "optimizer; the learning-rate schedule goes on); default: it continues")
    reset_ema: bool = _opt(False, "at each round's start, restart the EMA from the student's current weights, with "
                                  "its warm-up; default: it continues")
    eval_model: str | None = _opt(None, "a Hugging Face causal LM folder (pip install -e '.[eval]'): generative "
                                        "perplexity of the samples drawn at the end of each round")
    eval_samples: int = _opt(8, "sequences sampled with the EMA weights at the end of each round")
    eval_sampler: str = _opt("both", "the PGM sampler(s) of the round-end samples: uniform (near-equal chunks), "
                                     "binomial (per-position reveals, what SDTT's student imitates), or both",
                             choices=EVAL_SAMPLERS)
    teacher_precision: str = _opt("auto", "the teacher's compute precision: auto (the student's: bf16 autocast "
                                          "when the run trains in bf16, else fp32), fp32, or bf16; its weights "
                                          "stay fp32", choices=TEACHER_PRECISIONS)

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
        return SDTTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SDTTConfig)})


def parse_distill_config(argv: list[str] | None = None) -> DistillConfig:
    """``pgm_dist/distill.py``'s options (also the launcher's ``--entry distill``); argparse errors exit 2."""
    return parse_train_config(argv, DistillConfig, prog="deepspeed pgm_dist/distill.py",
                              description="Distil a trained model with SDTT (self-distillation through time).",
                              epilog=__doc__)

