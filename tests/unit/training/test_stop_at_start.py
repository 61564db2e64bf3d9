"""The loop's side of a stop: a signal that arrived during start-up ends the run before its first
step (nothing trained, nothing saved), the flag installed early is the one the loop reads, and a
save that takes most of --signal-delay is warned about once. Real engine and loop, world of one."""
from __future__ import annotations

import os
import signal

import pytest

from pgm_dist.checkpoints.format import complete_checkpoints
from pgm_dist.training.loop import REQUEUE_S, SAVE_BUDGET_SHARE, StopFlag
from tests.unit.training.test_nonfinite import _loop


@pytest.fixture
def handlers():
    """No flag installed at the start (another test's loop may have left its own), restored after."""
    saved = {sig: signal.getsignal(sig) for sig in StopFlag.LEVELS}
    for sig in StopFlag.LEVELS:
        signal.signal(sig, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_flag_installed_before_start_up_is_the_loops(handlers):
    early = StopFlag.installed()
    assert StopFlag.installed() is early
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # someone replaced a handler: a new flag
    assert StopFlag.installed() is not early


@pytest.mark.parametrize("sig, status", [(signal.SIGUSR2, "preempted"), (signal.SIGTERM, "stopped")])
def test_a_signal_during_start_up_ends_the_run_before_its_first_step(small_data, tmp_path, world_of_one, handlers,
                                                                     sig, status):
    StopFlag.installed()
    os.kill(os.getpid(), sig)  # while the engine is built
    loop, _ = _loop(small_data, tmp_path, world_of_one, poisoned=set(), max_steps=3)
    assert loop.stop_requested() == StopFlag.LEVELS[sig]
    assert loop.run() == status
    assert loop.state.step == 0 and complete_checkpoints(tmp_path / "checkpoints") == []


def test_a_save_close_to_the_signal_delay_is_warned_about_once(small_data, tmp_path, world_of_one, handlers, capsys):
    loop, _ = _loop(small_data, tmp_path, world_of_one, poisoned=set(), max_steps=6)  # saves at 3 and 6
    loop.save_budget_s = 1000.0
    assert loop.run() == "finished"
    assert "warning:" not in capsys.readouterr().out  # a save of a tiny model is far from 1000 s
    loop, _ = _loop(small_data, tmp_path / "tight", world_of_one, poisoned=set(), max_steps=6)
    loop.save_budget_s = REQUEUE_S / SAVE_BUDGET_SHARE  # the requeue alone takes the whole share
    assert loop.run() == "finished"
    out = capsys.readouterr().out
    assert out.count("warning: a step (") == 1  # once, not at every save
    assert f"+ the requeue (~{REQUEUE_S} s) take" in out and "submit with a larger --signal-delay" in out
