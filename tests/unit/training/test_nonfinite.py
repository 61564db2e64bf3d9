"""A non-finite loss skips the update and is counted; too many in a row stop the run
with the last checkpoint intact. Runs the real engine and loop in-process (world of one)."""
from __future__ import annotations

import time

import pytest
import torch

from pgm_dist.checkpoints.format import MARKER, complete_checkpoints
from pgm_dist.checkpoints.saver import Checkpointer
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder
from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig
from pgm_dist.objectives import PGMObjective
from pgm_dist.training.config import TrainConfig, resolve_ds_config
from pgm_dist.training.engine import Engine
from pgm_dist.training.loop import LoopParts, NonFiniteError, TrainingLoop, TrainState
from pgm_dist.training.writer import NullWriter


class PoisonedObjective(PGMObjective):
    """The PGM loss, made NaN on chosen calls (one call per step: no accumulation)."""

    def __init__(self, poisoned_calls):
        super().__init__()
        object.__setattr__(self, "poisoned", set(poisoned_calls))
        object.__setattr__(self, "calls", [0])

    def loss(self, model, tokens, t, generator=None):
        loss = super().loss(model, tokens, t, generator)
        self.calls[0] += 1
        return loss * float("nan") if self.calls[0] in self.poisoned else loss


def _loop(small_data, tmp_path, env, poisoned, max_steps, log_every=1):
    folder = DataFolder.open(small_data)
    cfg = TrainConfig(max_steps=max_steps, max_nonfinite=2, ckpt_every=3, eval_every=0, log_every=log_every,
                      progress=False, out=str(tmp_path), warmup_steps=1)
    ds_config = resolve_ds_config("ds_configs/zero2.json", world_size=1, device=torch.device("cpu"),
                                  micro_batch=4, global_batch=4)
    model_config = ModelConfig.preset("pgm-tiny", vocab_size=folder.meta.vocab_size, seq_len=folder.meta.seq_len)
    torch.manual_seed(0)
    engine = Engine(build_model(model_config), PoisonedObjective(poisoned), cfg, ds_config, env,
                    torch.device("cpu"))
    loader = TrainLoader(folder.train_sources, seq_len=folder.meta.seq_len, micro_batch=4, num_workers=0)
    parts = LoopParts(engine, loader, lambda: [], Checkpointer(tmp_path / "checkpoints", env, 3, 3, 0),
                      NullWriter(), lambda model, step: [], lambda state: {"step": state.step}, None)
    return TrainingLoop(parts, TrainState()), engine


def test_nonfinite_step_is_skipped_and_counted(small_data, tmp_path, world_of_one):
    loop, engine = _loop(small_data, tmp_path, world_of_one, poisoned={2}, max_steps=3)
    before = {}

    def snapshot(step):
        before[step] = {k: v.detach().clone() for k, v in engine.module.named_parameters()}

    batches = iter(loop.p.train_loader)
    for step in range(3):
        snapshot(step)
        result = engine.train_step(batches, step)
        assert result.applied == (step != 1)
    unchanged = all(torch.equal(before[1][k], before[2][k]) for k in before[1])
    assert unchanged  # the poisoned step 2 (index 1) did not touch the weights
    assert any(not torch.equal(before[0][k], before[1][k]) for k in before[0])


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(small_data, tmp_path, world_of_one):
    loop, _ = _loop(small_data, tmp_path, world_of_one, poisoned={5, 6, 7, 8}, max_steps=10)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        loop.run()
    assert loop.state.step == 6 and loop.state.nonfinite_steps == 2
    done = complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in done] == ["step_00000003"] and (done[0] / MARKER).is_file()


class RecordingWriter(NullWriter):
    """Keeps the training scalars logged, with the wall-clock time of the call."""

    def __init__(self):
        self.logged: dict[int, tuple[dict, float]] = {}

    def scalars(self, values: dict, step: int, tokens: int) -> None:
        if "train/loss" in values:
            self.logged[step] = (values, time.perf_counter())


def test_throughput_counts_the_steps_of_a_short_window_after_resume(small_data, tmp_path, world_of_one):
    """Resumed at step 3 with --log-every 2: the window logged at step 4 holds one step, the one
    at step 6 two (one of them skipped as non-finite: it still took time)."""
    loop, _ = _loop(small_data, tmp_path, world_of_one, poisoned={2}, max_steps=6, log_every=2)
    loop.state.step = 3  # what restore() leaves after loading a step-3 checkpoint
    loop.p.writer = writer = RecordingWriter()
    start = time.perf_counter()
    loop.run()
    assert sorted(writer.logged) == [4, 6] and loop.state.nonfinite_steps == 1
    (at4, time4), (at6, time6) = writer.logged[4], writer.logged[6]
    # The window's time lies inside the wall time between the writer calls and fills most of it.
    for values, steps, wall in ((at4, 1, time4 - start), (at6, 2, time6 - time4)):
        assert 0.75 * wall < values["perf/step_time_s"] * steps <= wall
        assert values["perf/tokens_per_s"] == pytest.approx(loop.tokens_per_step / values["perf/step_time_s"])
        assert values["perf/model_tflops_per_s"] == pytest.approx(
            values["perf/tokens_per_s"] * loop.flops_per_token / 1e12)
