"""The loop's stop flag: which signal raised it decides what the run does after its save."""
import os
import signal

import pytest

from pgm_dist.training.loop import StopFlag


@pytest.fixture
def flag():
    saved = {sig: signal.getsignal(sig) for sig in StopFlag.LEVELS}
    yield StopFlag()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_no_signal_no_stop(flag):
    assert (flag.raised, flag.level) == (False, 0)


def test_sigusr2_asks_for_a_requeue(flag):
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.raised and StopFlag.STATUS[flag.level] == "preempted"


def test_sigterm_asks_to_stop_and_wins_over_sigusr2_in_either_order(flag):
    os.kill(os.getpid(), signal.SIGTERM)
    assert StopFlag.STATUS[flag.level] == "stopped"
    os.kill(os.getpid(), signal.SIGUSR2)
    assert StopFlag.STATUS[flag.level] == "stopped"  # a later warning does not turn a cancel into a requeue
