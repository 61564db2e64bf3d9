"""Self-Distillation Through Time (section 8 of docs/pgm-algorithm.md): the SDTT objective.

A student learns to do in one step what its frozen teacher does in ``m`` ancestral
steps of size ``dt``. Rounds: every ``round_steps`` optimizer steps the student's
weights become the teacher and ``dt`` doubles, halving the student's sampling steps.

The objective has the engine's interface (``loss``, ``nelbo``, ``t_min``,
``state_dict``/``load_state_dict``); distillation's step hook (``pgm_dist/distillation/task.py``,
called by the training loop after every optimizer step) drives the rounds with
:meth:`SDTTObjective.maybe_advance` (see its docstring).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from pgm_dist.objectives import LogLinearSchedule, partition_groups
from pgm_dist.sampling import sample_categorical
from pgm_dist.training.components import objective_for

# The file beside the DeepSpeed shards that holds the teacher's weights of a checkpoint.
TEACHER_FILE = "teacher.safetensors"
TEACHER_SOURCES = ("raw", "ema")


def kl_reverse(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(student || teacher) = sum_v p_s (log p_s - log p_t)``: log-probs [N, V] -> [N]."""
    return (student.exp() * (student - teacher)).sum(-1)


def kl_forward(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(teacher || student) = sum_v p_t (log p_t - log p_s)``: log-probs [N, V] -> [N]."""
    return (teacher.exp() * (teacher - student)).sum(-1)


def mse_log_probs(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the vocabulary of ``(log p_s - log p_t)^2`` (the scale of the reference's
    ``F.mse_loss``): log-probs [N, V] -> [N]."""
    return (student - teacher).square().mean(-1)


def total_variation(student: Tensor, teacher: Tensor) -> Tensor:
    """``0.5 * sum_v |p_s - p_t|`` on probabilities, in [0, 1]: log-probs [N, V] -> [N]."""
    return 0.5 * (student.exp() - teacher.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl-rev": kl_reverse, "kl-fwd": kl_forward, "mse": mse_log_probs, "tv": total_variation,
}


@dataclass(frozen=True)
class SDTTConfig:
    """Distillation settings (the ``distill.py`` options).

    start_steps: the teacher's sampling steps in the first round, K0; ``dt`` starts at
    ``1 / K0`` and doubles every round. teacher_steps: m, the teacher's ancestral steps
    per target. The student of round r (0-based) samples in ``K0 / (m 2^r)`` steps (see
    :meth:`SDTTObjective.sampling_steps`), so K0 must be m times a power of two.
    round_steps: optimizer steps per round. Distillation runs ``rounds`` rounds, fewer when
    a round's student would sample in fewer than ``min_steps`` steps. teacher_source:
    the student weights that become the next teacher, ``raw`` or ``ema``.

    The defaults are the command line's (a CPU quick start: students at 32, 16 and 8 steps);
    :meth:`paper` gives the papers' schedule.
    """

    start_steps: int = 64
    teacher_steps: int = 2
    round_steps: int = 50
    rounds: int = 3
    min_steps: int = 8
    divergence: str = "kl-rev"
    teacher_source: str = "raw"
    t_min: float = 1e-5

    @classmethod
    def paper(cls, **overrides) -> "SDTTConfig":
        """The papers' schedule: K0 1024, 10,000 optimizer steps per round, 7 rounds (512 ... 8 steps)."""
        return cls(**{"start_steps": 1024, "round_steps": 10_000, "rounds": 7, **overrides})

    def __post_init__(self):
        if self.teacher_steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {self.teacher_steps}")
        ratio, rest = divmod(self.start_steps, self.teacher_steps)
        if ratio < 1 or rest or ratio & (ratio - 1):
            raise ValueError(
                f"start steps {self.start_steps} must be a power of two times the teacher steps "
                f"{self.teacher_steps} (e.g. {self.teacher_steps * 512}), so that every round's student "
                "samples in a whole number of steps")
        if self.round_steps < 1 or self.rounds < 1 or self.min_steps < 1:
            raise ValueError(f"round steps, rounds and min steps must be >= 1, got {self.round_steps}, "
                             f"{self.rounds}, {self.min_steps}")
        if self.start_steps // self.teacher_steps < self.min_steps:
            raise ValueError(f"no round to run: the first student would sample in "
                             f"{self.start_steps // self.teacher_steps} steps, below min steps {self.min_steps}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; valid: {', '.join(DIVERGENCES)}")
        if self.teacher_source not in TEACHER_SOURCES:
            raise ValueError(f"unknown teacher source {self.teacher_source!r}; valid: {', '.join(TEACHER_SOURCES)}")
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")

    @property
    def num_rounds(self) -> int:
        """``rounds``, or fewer: the rounds whose student samples in at least ``min_steps`` steps."""
        # sampling steps of round r >= min_steps  <=>  2^r <= start_steps / (m min_steps)
        fitting = (self.start_steps // self.teacher_steps // self.min_steps).bit_length()
        return min(self.rounds, fitting)


def expected_masked_fraction(schedule: LogLinearSchedule, t_min: float) -> float:
    """``E[1 - alpha(t)]`` for ``t`` uniform on ``[t_min, 1)`` (the engine's low-discrepancy times):
    ``(1 - eps) (1 + t_min) / 2``, the masked share of a micro-batch in expectation."""
    return (1 - schedule.eps) * (1 + t_min) / 2


def noisy_input(tokens: Tensor, masked: Tensor, config) -> Tensor:
    """The network input at a masked set: MASK ids for MDLM; for a PGM any value is exact
    (group-1 tokens cannot reach group-1 logits), 0 is used. tokens, masked: [B, L]."""
    return tokens.masked_fill(masked, config.mask_id if config.arch == "mdlm" else 0)


def predictive_log_probs(model, noisy: Tensor, masked: Tensor, config) -> Tensor:
    """float32 log-probs [B, L, V] over the vocabulary.

    A PGM runs at full length with ``groups = masked``; MDLM reads the MASK ids of ``noisy``.
    Dense, unlike the pre-training losses: the divergences need whole distributions.
    """
    logits = model(noisy, masked) if config.arch == "pgm" else model(noisy)
    return logits.log_softmax(-1)


@torch.no_grad()
def teacher_target(teacher: nn.Module, noisy: Tensor, masked: Tensor, t: Tensor, dt: float, steps: int,
                   schedule: LogLinearSchedule, t_min: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The teacher's ``steps`` ancestral steps of size ``dt`` from ``t``.

    noisy: [B, L] network input (see :func:`noisy_input`); masked: [B, L] bool; t: [B].
    Step k runs from ``t_k = max(t - k dt, t_min)`` to ``max(t - (k+1) dt, t_min)``: the
    teacher predicts every still-masked position, and each one is revealed with the exact
    probability ``reveal_probability(t_k, t_{k+1})``, gets step k's distribution as its
    target, and its token, drawn by float64 Gumbel-max, is input to the following steps.
    Positions still masked before the last step get the last step's distribution, as do
    those it reveals, so the last step draws nothing.

    Draws, in order, per step k < steps - 1: ``rand([B, L], float64)`` for the reveals,
    then ``rand([N_k, V], float64)`` Gumbel noise for the N_k revealed positions in
    row-major order.

    Returns (target float32 log-probs [B, L, V], zero at clean positions; source [B, L]
    long: the step whose distribution is the target, -1 at clean positions).
    """
    if steps < 1:
        raise ValueError(f"teacher steps must be >= 1, got {steps}")
    config = teacher.config
    B, L = noisy.shape
    target = torch.zeros(B, L, config.vocab_size, device=noisy.device)
    source = torch.full((B, L), -1, dtype=torch.long, device=noisy.device).masked_fill(masked, steps - 1)
    x, still_masked, t = noisy.clone(), masked.clone(), t.double()
    for k in range(steps - 1):
        log_probs = predictive_log_probs(teacher, x, still_masked, config)
        t_k, t_next = (t - k * dt).clamp_min(t_min), (t - (k + 1) * dt).clamp_min(t_min)
        p = schedule.reveal_probability(t_k, t_next)  # [B]
        u = torch.rand(B, L, dtype=torch.float64, generator=generator, device=noisy.device)
        reveal = still_masked & (u < p[:, None])
        target[reveal] = log_probs[reveal]
        source[reveal] = k
        x[reveal] = sample_categorical(log_probs[reveal], generator)
        still_masked &= ~reveal
    last = predictive_log_probs(teacher, x, still_masked, config)
    return torch.where(still_masked[..., None], last, target), source


class SDTTObjective:
    """The SDTT loss, its frozen teacher and its round state.

    The teacher is held here, not as a submodule of the student: it is in eval mode,
    without gradients and never an optimizer parameter. Use :meth:`from_student` to
    start the teacher as a copy of the student.
    """

    # The state dict key whose weights the training loop writes to a file beside the shards.
    state_files = {"teacher": TEACHER_FILE}

    def __init__(self, teacher: nn.Module, config: SDTTConfig = SDTTConfig()):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.base = objective_for(teacher.config)  # validation NELBO: the pre-training one
        self.schedule = self.base.schedule  # the masking and reveals of pre-training
        self.round = 0  # 0-based: round r distils steps of size 2^r / start_steps
        # Run the teacher under bf16 autocast (set by the task when the student trains in bf16): its two
        # forward passes per step would otherwise cost several student steps on a GPU.
        self.teacher_autocast = False
        self.round_start_step = 0  # the optimizer step count at which the current round began

    @classmethod
    def from_student(cls, student: nn.Module, config: SDTTConfig = SDTTConfig()) -> "SDTTObjective":
        return cls(copy.deepcopy(student), config)

    @property
    def t_min(self) -> float:
        return self.config.t_min

    # -- rounds --------------------------------------------------------------------------
    @property
    def dt(self) -> float:
        """The teacher's step size in the current round: ``2^round / start_steps``."""
        return 2**self.round / self.config.start_steps

    def sampling_steps(self, round_index: int | None = None) -> int:
        """The sampling steps of the student trained in round ``round_index`` (default: the current one).

        It matches ``m`` teacher steps of size ``dt_r`` with one step, so it samples with
        steps of ``m dt_r``: ``start_steps / (m 2^r)`` (512, 256, ... from 1024 with m = 2).
        """
        r = self.round if round_index is None else round_index
        return self.config.start_steps // (self.config.teacher_steps * 2**r)

    @property
    def num_rounds(self) -> int:
        return self.config.num_rounds

    def round_ends_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based count of steps done) ends the current round."""
        return step == self.round_start_step + self.config.round_steps

    def maybe_advance(self, step: int, student_weights: Callable[[str], Mapping[str, Tensor]]) -> bool:
        """At the end of a round that is not the last, start the next one: the student's
        weights become the teacher, ``dt`` doubles. Returns whether it did.

        Call after an optimizer step with the completed step count, before any checkpoint
        of that step: a checkpoint of a boundary step then already holds the new round, so
        a restored run never crosses that boundary again. ``student_weights(source)``
        returns the student's fp32 weights by parameter name, for ``source`` =
        ``config.teacher_source`` (``raw``: the fp32 master weights, gathered from the ZeRO
        partitions; ``ema``: the EMA shadow); it is called only at a round boundary.
        """
        if not self.round_ends_at(step) or self.round + 1 >= self.num_rounds:
            return False
        self._load_teacher(student_weights(self.config.teacher_source))
        self.round += 1
        self.round_start_step = step
        return True

    def _load_teacher(self, weights: Mapping[str, Tensor]) -> None:
        params = dict(self.teacher.named_parameters())
        if set(params) != set(weights):
            raise ValueError(f"student weights do not match the teacher: {sorted(set(params) ^ set(weights))[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Round state and the teacher's weights (CPU copies, under ``teacher``).

        The training loop (per :attr:`state_files`) writes ``teacher`` to :data:`TEACHER_FILE`
        (``teacher.safetensors``) beside the DeepSpeed shards, before the completion
        marker, keeps the rest in the client state, and puts the loaded tensors back
        under ``teacher`` before :meth:`load_state_dict`.
        """
        cfg = self.config
        return {
            "round": self.round, "dt": self.dt, "round_start_step": self.round_start_step,
            "start_steps": cfg.start_steps, "teacher_steps": cfg.teacher_steps,
            "teacher": {name: p.detach().to("cpu", copy=True) for name, p in self.teacher.named_parameters()},
        }

    def load_state_dict(self, state: dict) -> None:
        cfg = self.config
        if (state["start_steps"], state["teacher_steps"]) != (cfg.start_steps, cfg.teacher_steps):
            raise ValueError(
                f"the checkpoint was distilled with start steps {state['start_steps']} and teacher steps "
                f"{state['teacher_steps']}; resume with the same values (got {cfg.start_steps}, {cfg.teacher_steps})")
        self._load_teacher(state["teacher"])
        self.round, self.round_start_step = state["round"], state["round_start_step"]
        if not math.isclose(self.dt, state["dt"]):
            raise ValueError(f"inconsistent SDTT state: dt {state['dt']} in round {self.round} "
                             f"(expected {self.dt})")

    # -- the engine's interface ----------------------------------------------------------
    def loss(self, model, tokens: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``D(student || teacher target)`` summed over the masked positions, divided by the expected
        masked count of the micro-batch (:meth:`divergence_loss`).

        tokens: [B, L]; t: [B]. The masked set is drawn as in pre-training (each token with
        probability ``1 - alpha(t)``), then the teacher target (in the teacher's precision,
        :attr:`teacher_autocast`), then one student pass on the same input.
        """
        arch = self.teacher.config
        masked = partition_groups(t, tokens.shape[1], self.schedule, generator)
        noisy = noisy_input(tokens, masked, arch)
        with self._teacher_precision(tokens.device):
            target, _ = teacher_target(self.teacher, noisy, masked, t, self.dt, self.config.teacher_steps,
                                       self.schedule, self.t_min, generator)
        return self.divergence_loss(model, noisy, masked, target.float())

    def divergence_loss(self, model, noisy: Tensor, masked: Tensor, target: Tensor) -> Tensor:
        """The student's divergence from ``target`` at the ``masked`` positions, summed, over
        ``B L`` times the expected masked fraction (:func:`expected_masked_fraction`), a count
        that does not depend on the draw. Dividing by the micro-batch's own masked count (the
        reference's ``batchmean``) would make the objective depend on how the global batch is
        split: the engine averages micro-batches with equal weight, so the positions of a
        low-noise micro-batch (few masked) would weigh more than those of a high-noise one, and
        the weights would change with the micro-batch size, world size and accumulation. Here
        every masked position of the global batch weighs the same, however it is split."""
        student = predictive_log_probs(model, noisy, masked, self.teacher.config)
        per_position = DIVERGENCES[self.config.divergence](student[masked], target[masked])
        return per_position.sum() / (masked.numel() * expected_masked_fraction(self.schedule, self.t_min))

    def _teacher_precision(self, device: torch.device):
        """bf16 autocast for the teacher when the student computes in bf16 (:attr:`teacher_autocast`);
        the teacher's weights stay fp32 (and fp32 in the checkpoint)."""
        if self.teacher_autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def eval_t_min(self) -> float:
        """The validation NELBO's time floor: pre-training's, so that it stays comparable."""
        return self.base.t_min

    def nelbo(self, model, tokens: Tensor, t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """The pre-training NELBO terms of the student's architecture, so validation stays
        comparable with pre-training (at pre-training's time floor, :attr:`eval_t_min`)."""
        return self.base.nelbo(model, tokens, t, generator)
