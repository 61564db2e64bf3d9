"""Every sampling and distillation option changes what it should: each test compares a run with the
option against one without it, so an option the code ignores fails here."""
from __future__ import annotations

import re

import pytest
import torch

from pgm_dist.distillation.config import parse_distill_config
from pgm_dist.distillation.objective import SDTTConfig
from pgm_dist.images.sampling import sample_image_pgm
from pgm_dist.sample import main as sample_main
from tests.helpers.legacy import LEGACY
from tests.helpers.models import randomized_model

EXPORT = LEGACY / "export"  # a pgm-tiny export with its tokenizer (vocabulary 400, L 32)
BASE = ["--model", str(EXPORT), "--num", "3", "--steps", "8", "--seed", "0", "--device", "cpu"]


def samples(capsys, *options: str) -> list[str]:
    assert sample_main([*BASE, *options]) == 0
    out = capsys.readouterr()
    return re.findall(r"--- sample \d+ ---\n(.*?)(?=\n--- sample|\Z)", out.out, re.S)


@pytest.fixture
def default(capsys):
    return samples(capsys)


@pytest.mark.parametrize("options", [
    ("--seed", "1"), ("--steps", "2"), ("--temperature", "0.3"), ("--top-p", "0.2"), ("--temperature", "0"),
])
def test_each_text_sampling_option_changes_the_samples(capsys, default, options):
    changed = samples(capsys, *options)
    assert len(changed) == 3 and changed != default


def test_num_and_prompt_take_effect(capsys, default):
    assert len(samples(capsys, "--num", "2")) == 2
    prompted = samples(capsys, "--prompt", "def main")
    assert all(text.startswith("def main") for text in prompted) and prompted != default


def test_the_same_options_give_the_same_samples(capsys, default):
    assert samples(capsys) == default  # so that the differences above come from the options


@pytest.fixture(scope="module")
def image_pgm():
    return randomized_model("pgm-img-tiny", vocab_size=18, seq_len=65, num_classes=10, image_grid=[8, 8])


@pytest.mark.parametrize("option", [
    {"cfg": 3.0}, {"cfg": 3.0, "cfg_ramp": "constant"}, {"temperature": 0.2}, {"order": "random"},
])
def test_each_image_sampling_option_changes_the_pictures(image_pgm, option):
    labels = torch.tensor([0, 3, 7, 9])

    def draw(**sampler):
        return sample_image_pgm(image_pgm, labels, 8, generator=torch.Generator().manual_seed(0), **sampler)

    base = {"cfg": 3.0} if "cfg_ramp" in option else {}  # the ramp shows only under guidance
    assert torch.equal(draw(**base), draw(**base))
    assert not torch.equal(draw(**option), draw(**base))


@pytest.mark.parametrize("flag, value, field", [
    ("--start-steps", "128", "start_steps"), ("--teacher-steps", "4", "teacher_steps"),
    ("--round-steps", "7", "round_steps"), ("--rounds", "5", "rounds"), ("--min-steps", "2", "min_steps"),
    ("--divergence", "tv", "divergence"), ("--teacher-source", "ema", "teacher_source"), ("--t-min", "0.01", "t_min"),
])
def test_each_sdtt_option_reaches_the_objectives_config(flag, value, field):
    cfg = parse_distill_config([flag, value])
    default = getattr(SDTTConfig(), field)
    assert getattr(cfg.sdtt, field) == type(default)(value) != default


@pytest.mark.parametrize("flag, field", [("--reset-optimizer", "reset_optimizer"), ("--reset-ema", "reset_ema"),
                                         ("--teacher-precision", "teacher_precision")])
def test_the_round_options_reach_the_task(flag, field):
    argv = [flag] if flag.startswith("--reset") else [flag, "bf16"]
    assert getattr(parse_distill_config(argv), field) != getattr(parse_distill_config([]), field)


def test_rounds_beyond_the_second_keep_doubling_the_step_and_min_steps_stops_them():
    from pgm_dist.distillation.objective import SDTTObjective

    objective = SDTTObjective.from_student(randomized_model("pgm-tiny"), SDTTConfig(
        start_steps=32, teacher_steps=2, round_steps=1, rounds=4, min_steps=1))
    seen = []
    for step in range(1, 5):
        seen.append((objective.round, objective.dt, objective.sampling_steps()))
        objective.maybe_advance(step, lambda source: dict(objective.teacher.named_parameters()))
    assert seen == [(0, 1 / 32, 16), (1, 2 / 32, 8), (2, 4 / 32, 4), (3, 8 / 32, 2)]
    assert SDTTConfig(start_steps=32, rounds=4, min_steps=4).num_rounds == 3  # the 2-step round is dropped
