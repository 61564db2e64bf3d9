"""The training loop shared by pre-training and distillation.

Reads top to bottom: step -> (log) -> (evaluate) -> (sample) -> (checkpoint), with
every decision that must agree across ranks (time-based checkpoint, preemption
signal) reduced at the step boundary. Everything that must survive a restart is in
the checkpoint: train state, EMA, every rank's data-loader state, the objective's
state (if it has one), DeepSpeed's optimizer and schedule.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from pgm_dist.checkpoints.format import load_ema_weights
from pgm_dist.checkpoints.saver import Checkpointer
from pgm_dist.common.distributed import all_gather_objects, all_reduce
from pgm_dist.models.flops import peak_flops, training_flops_per_token
from pgm_dist.training.engine import Engine
from pgm_dist.training.telemetry import GpuTelemetry
from pgm_dist.training.writer import NullWriter

# What the save budget check allows for ``scontrol requeue`` and the exit after a save, and the share of
# --signal-delay that a step, a save and the requeue may take before rank 0 warns.
REQUEUE_S = 10
SAVE_BUDGET_SHARE = 0.75


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    restarts: int = 0
    nonfinite_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StopFlag:
    """Set by a signal, acted upon at the next step boundary only, where ranks agree on the
    strongest one (all-reduced max of :attr:`level`): SIGUSR2 (SLURM's time-limit warning,
    ``scancel --signal=USR2``) asks to save and come back, "preempted"; SIGTERM (``scancel``, a
    scheduler preemption, ``kill``) asks to save and stop, "stopped"."""

    LEVELS = {signal.SIGUSR2: 1, signal.SIGTERM: 2}
    STATUS = {1: "preempted", 2: "stopped"}

    def __init__(self):
        self.level = 0
        for sig in self.LEVELS:
            signal.signal(sig, self._handler)

    @classmethod
    def installed(cls) -> StopFlag:
        """The flag whose handlers are installed now (a job installs it before its start-up, so a
        signal that arrives while the model is built is kept for the loop), or a new one."""
        handler = signal.getsignal(signal.SIGTERM)
        flag = getattr(handler, "__self__", None)
        if isinstance(flag, cls) and all(signal.getsignal(sig) == handler for sig in cls.LEVELS):
            return flag
        return cls()

    @property
    def raised(self) -> bool:
        return self.level > 0

    def _handler(self, signum, frame) -> None:
        self.level = max(self.level, self.LEVELS[signum])


@dataclass
class LoopParts:
    engine: Engine
    train_loader: object  # has __iter__, state_dict(), load_state_dict(), skipped_shards
    val_loader_factory: Callable[[], object]
    checkpointer: Checkpointer
    writer: NullWriter
    # (model with EMA weights, step) -> texts, or (image runs) a picture grid uint8 [H, W, 3]
    sample: Callable[[torch.nn.Module, int], list[str] | np.ndarray]
    checkpoint_state: Callable[[TrainState], dict]  # pgm_state.json contents
    tokenizer_path: Path | None
    # Called with the completed step count right after each optimizer step, before that step's
    # logging and checkpoint decision (distillation's round boundaries).
    on_step: Callable[[int], None] | None = None
    # (the values about to be logged) -> more values logged with them at the same step.
    extra_scalars: Callable[[dict], dict] | None = None


class TrainingLoop:
    def __init__(self, parts: LoopParts, state: TrainState, log=print):
        self.p, self.state, self.log = parts, state, log
        self.cfg = parts.engine.cfg
        self.env = parts.engine.env
        engine = parts.engine
        self.tokens_per_step = engine.global_batch * engine.module.config.seq_len
        self.flops_per_token = training_flops_per_token(engine.module, engine.module.config)
        device = engine.device
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.telemetry = GpuTelemetry.for_device(device)
        self.stop = StopFlag.installed()
        # --signal-delay of a launcher job: a step, a save and the requeue must fit in it (warned once)
        self.save_budget_s: float | None = None
        self._step_s = 0.0  # the latest step's time
        self._budget_warned = False
        self.last_texts: list[str] = []
        self._last_saved: int | None = None  # the step of the last checkpoint this process wrote or loaded
        self._consecutive_bad = 0  # non-finite steps in a row

    # -- checkpoint state ----------------------------------------------------------------
    def client_state(self) -> tuple[dict, dict[str, dict]]:
        """(DeepSpeed's client state, {file name: tensors} of the objective's ``state_files``).

        An objective's ``state_files`` maps keys of its state dict that hold weights (the SDTT
        teacher) to safetensors files beside the shards, kept out of the pickled client state.
        """
        objective = self.p.engine.objective
        state = objective.state_dict() if hasattr(objective, "state_dict") else None
        files = {name: state.pop(key) for key, name in getattr(objective, "state_files", {}).items()}
        return {
            "train_state": self.state.state_dict(),
            "data": all_gather_objects(self.p.train_loader.state_dict()),
            "objective": state,
            "ema_updates": self.p.engine.ema.updates,
            "universal_checkpoint_info": {},
        }, files

    def restore(self, client_state: dict, checkpoint: Path) -> None:
        """Everything but DeepSpeed's own state from ``client_state`` and the files of ``checkpoint``."""
        self.state.load_state_dict(client_state["train_state"])
        data = client_state["data"]
        self.p.train_loader.load_state_dict(data[self.env.rank] if self.env.rank < len(data) else data[0])
        objective = self.p.engine.objective
        if client_state.get("objective") is not None:
            state = dict(client_state["objective"])
            for key, name in getattr(objective, "state_files", {}).items():
                state[key] = load_file(str(checkpoint / name))
            objective.load_state_dict(state)
        self.p.engine.ema.load_state_dict({"updates": client_state["ema_updates"],
                                           "shadow": load_ema_weights(checkpoint)})

    def save(self) -> Path:
        engine = self.p.engine
        start = time.perf_counter()
        client_state, files = self.client_state()
        path = self.p.checkpointer.save(engine.ds, self.state.step, client_state,
                                        self.p.checkpoint_state(self.state), engine.ema.whole(),
                                        self.p.tokenizer_path, files)
        # What a preemption's save costs (SLURM's --signal-delay must cover a step and a save).
        seconds = time.perf_counter() - start
        self.p.writer.scalars({"ckpt/save_s": seconds}, self.state.step, self.state.tokens_seen)
        self._check_save_budget(seconds)
        return path

    def _check_save_budget(self, save_s: float) -> None:
        """Rank 0 warns (once) when a step, a save and the requeue take most of ``save_budget_s``: a
        time-limit warning could then not be answered before SLURM kills the job."""
        if self.save_budget_s is None or self._budget_warned or not self.env.is_main:
            return
        needed = self._step_s + save_s + REQUEUE_S
        if needed > SAVE_BUDGET_SHARE * self.save_budget_s:
            self._budget_warned = True
            tqdm.write(f"warning: a step ({self._step_s:.1f} s) + a checkpoint save ({save_s:.1f} s) + the requeue "
                       f"(~{REQUEUE_S} s) take {needed:.0f} s of the {self.save_budget_s:.0f} s between SLURM's "
                       "time-limit warning and its kill: submit with a larger --signal-delay")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> str:
        """Train to ``max_steps``; returns "finished", or after a signal's save "preempted" (SIGUSR2:
        to be requeued) or "stopped" (SIGTERM)."""
        cfg, engine, state = self.cfg, self.p.engine, self.state
        batches = iter(self.p.train_loader)
        bar = tqdm(total=cfg.max_steps, initial=state.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.env.is_main))
        window = self._new_window()
        # A resumed run starts at the step of the checkpoint it loaded: never save that step again.
        self._last_saved, self._consecutive_bad = state.step or None, 0
        stop = self.stop_requested()
        if stop:  # a signal during start-up: back (or out) without training; nothing new to save
            bar.close()
            return StopFlag.STATUS[stop]
        try:
            while state.step < cfg.max_steps:
                started = time.perf_counter()
                result = engine.train_step(batches, state.step)
                self._step_s = time.perf_counter() - started
                self._count(result, window)
                bar.update(1)
                if state.step % cfg.log_every == 0:
                    self._log(window, result, bar)
                # Before validation and samples, so that a stop signal's save never waits for them.
                stop = self._save_if_due()
                if stop:
                    return StopFlag.STATUS[stop]
                self._evaluate_and_sample_if_due()
            self._finish()
        finally:
            bar.close()
        return "finished"

    def _new_window(self) -> dict:
        """What the next TensorBoard point averages: "applied" steps carry the mean loss; every step
        (a skipped non-finite one took time too) counts for throughput. A run resumed off a
        multiple of log_every starts with a shorter window."""
        return {"loss": torch.zeros((), device=self.p.engine.device), "applied": 0, "steps": 0, "wait": 0.0,
                "start": time.perf_counter()}

    def _count(self, result, window: dict) -> None:
        """One optimizer step done: the counters, the window, the step hook, the non-finite guard."""
        state = self.state
        state.step += 1
        state.samples_seen += self.p.engine.global_batch
        state.tokens_seen += self.tokens_per_step
        window["steps"] += 1
        window["wait"] += result.data_wait_s
        if self.p.on_step is not None:
            self.p.on_step(state.step)
        if result.applied:
            self._consecutive_bad = 0
            window["loss"] += result.loss
            window["applied"] += 1
            return
        self._consecutive_bad += 1
        state.nonfinite_steps += 1
        if self._consecutive_bad >= self.cfg.max_nonfinite:
            raise NonFiniteError(
                f"{self._consecutive_bad} consecutive steps with a non-finite loss or gradient norm "
                f"(up to step {state.step}); stopping. The last complete checkpoint is intact: "
                "lower --lr, check the data, or resume with another --seed")

    def _evaluate_and_sample_if_due(self) -> None:
        """Validation and samples, each when its interval comes."""
        cfg, step = self.cfg, self.state.step
        if cfg.eval_every and step % cfg.eval_every == 0:
            self._evaluate()
        if cfg.sample_every and step % cfg.sample_every == 0:
            self._sample()

    def stop_requested(self) -> int:
        """Collective: the strongest stop signal any rank has got (a :class:`StopFlag` level, 0: none),
        for work that a stop should skip (an evaluation, distillation's round-end samples)."""
        level = torch.tensor(float(self.stop.level), device=self.p.engine.device)
        return int(all_reduce(level, "max").item())

    def _save_if_due(self) -> int:
        """Save when the step or time interval comes or any rank got a stop signal (one all-reduce
        decides for every rank); returns the strongest signal's :class:`StopFlag` level (0: go on)."""
        flags = torch.tensor([float(self.p.checkpointer.due_by_time()), float(self.stop.level)],
                             device=self.p.engine.device)
        all_reduce(flags, "max")
        if self.p.checkpointer.due_by_steps(self.state.step) or flags[0] > 0 or flags[1] > 0:
            self.save()
            self._last_saved = self.state.step
        return int(flags[1].item())

    def _finish(self) -> None:
        """At max_steps: the final validation and samples (unless this step just had them) and save."""
        cfg, step = self.cfg, self.state.step
        if not cfg.eval_every or step % cfg.eval_every:
            self._evaluate()
        if not cfg.sample_every or step % cfg.sample_every:
            self._sample()
        if self._last_saved != step:
            self.save()

    def _log(self, window: dict, result, bar) -> None:
        engine, state = self.p.engine, self.state
        elapsed = time.perf_counter() - window["start"]
        steps = window["steps"]
        loss = torch.stack([window["loss"].double(), torch.tensor(float(window["applied"]), device=engine.device,
                                                                  dtype=torch.float64)])
        all_reduce(loss)
        skipped = all_reduce(torch.tensor(float(self.p.train_loader.skipped_shards), device=engine.device))
        mean_loss = (loss[0] / loss[1]).item() if loss[1] > 0 else float("nan")
        tokens_per_s = steps * self.tokens_per_step / elapsed
        values = {
            "train/loss": mean_loss, "train/lr": engine.lr, "train/grad_norm": result.grad_norm,
            "train/nonfinite_steps": state.nonfinite_steps,
            "perf/tokens_per_s": tokens_per_s, "perf/step_time_s": elapsed / steps,
            "perf/data_wait_frac": window["wait"] / elapsed,
            "perf/model_tflops_per_s": tokens_per_s * self.flops_per_token / 1e12,
            "perf/mfu": (tokens_per_s * self.flops_per_token / (self.peak * self.env.world_size)
                         if self.peak else None),
            "data/skipped_shards": skipped.item(), "run/world_size": self.env.world_size,
            "run/restarts": state.restarts, **self.telemetry.read(),
        }
        if self.p.extra_scalars is not None:
            values.update(self.p.extra_scalars(values))
        self.p.writer.scalars(values, state.step, state.tokens_seen)
        bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        window.update(self._new_window())

    def _evaluate(self) -> None:
        nelbo, ppl = self.p.engine.evaluate(self.p.val_loader_factory())
        self.p.writer.scalars({"val/nelbo": nelbo, "val/ppl": ppl}, self.state.step, self.state.tokens_seen)
        if self.env.is_main:
            tqdm.write(f"step {self.state.step}: val NELBO {nelbo:.4f} per token, perplexity {ppl:.2f}")

    def _sample(self) -> None:
        """Rank 0 samples; under ZeRO-3 every rank does (same generator, so the same collective
        forwards and the same texts) and rank 0 logs."""
        samples = self.p.engine.sample_with_ema(lambda model: self.p.sample(model, self.state.step))
        if samples is None:  # not rank 0
            return
        if isinstance(samples, np.ndarray):
            self.p.writer.image("samples/grid", samples, self.state.step)
            return
        self.last_texts = samples
        for i, text in enumerate(self.last_texts):
            self.p.writer.text(f"samples/{i}", text, self.state.step)
