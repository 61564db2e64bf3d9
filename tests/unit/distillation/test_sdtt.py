import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pgm_dist.distillation.objective import (
    DIVERGENCES,
    TEACHER_FILE,
    SDTTConfig,
    SDTTObjective,
    expected_masked_fraction,
    kl_forward,
    noisy_input,
    predictive_log_probs,
    teacher_target,
)
from pgm_dist.objectives import LogLinearSchedule, partition_groups
from pgm_dist.training.ema import EMA
from tests.helpers.models import randomized_model

EPS = 1e-3
T_MIN = 1e-5
TIMES = torch.tensor([0.3, 0.55, 0.8, 1.0])



def end_step(objective) -> int:
    """The optimizer step at which distillation ends, from the objective's round state."""
    return objective.round_start_step + (objective.num_rounds - objective.round) * objective.config.round_steps

def batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (TIMES.shape[0], model.config.seq_len), generator=g)


def slow_teacher_target(teacher, tokens, masked, t, dt, steps, generator):
    """Position by position: step k from max(t - k dt, t_min) to max(t - (k+1) dt, t_min),
    reveal with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), Gumbel-max draw from the
    teacher's float64 log-probs; the same generator draws as documented by teacher_target."""
    config = teacher.config
    B, L = tokens.shape
    V = config.vocab_size
    x = tokens.clone()
    still = masked.clone()
    hidden = config.mask_id if config.arch == "mdlm" else 0
    x[masked] = hidden
    target = torch.zeros(B, L, V, dtype=torch.float64)
    source = torch.full((B, L), -1, dtype=torch.long)
    for k in range(steps):
        logits = (teacher(x, still) if config.arch == "pgm" else teacher(x)).double()[..., :V]
        log_probs = logits - logits.logsumexp(-1, keepdim=True)
        if k == steps - 1:
            for b in range(B):
                for i in range(L):
                    if still[b, i]:
                        target[b, i], source[b, i] = log_probs[b, i], k
            break
        u = torch.rand(B, L, dtype=torch.float64, generator=generator)
        for b in range(B):
            t_k, t_s = max(t[b].item() - k * dt, T_MIN), max(t[b].item() - (k + 1) * dt, T_MIN)
            alpha_t, alpha_s = 1 - (1 - EPS) * t_k, 1 - (1 - EPS) * t_s
            p = (alpha_s - alpha_t) / (1 - alpha_t)
            for i in range(L):
                if still[b, i] and u[b, i].item() < p:
                    gumbel = -torch.log(-torch.log(torch.rand(V, dtype=torch.float64, generator=generator)))
                    x[b, i] = int((log_probs[b, i] + gumbel).argmax())
                    target[b, i], source[b, i] = log_probs[b, i], k
                    still[b, i] = False
    return target, source


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_teacher_target_equals_slow_reference(preset):
    teacher = randomized_model(preset)
    tokens = batch(teacher)
    schedule = LogLinearSchedule(EPS)
    masked = partition_groups(TIMES, tokens.shape[1], schedule, torch.Generator().manual_seed(1))
    # Step times clamp at the floor: t = 0.3 at the second step; t = 1.5e-5 at once, which reveals
    # 1/3 of its masked positions at step 0 and none at step 1 (t_min -> t_min).
    t = torch.tensor([0.3, 1.5e-5, 0.8, 1.0])
    dt, steps = 0.25, 3
    target, source = teacher_target(teacher, noisy_input(tokens, masked, teacher.config), masked, t, dt,
                                    steps, schedule, T_MIN, torch.Generator().manual_seed(2))
    expected_target, expected_source = slow_teacher_target(teacher, tokens, masked, t, dt, steps,
                                                           torch.Generator().manual_seed(2))
    assert (source[1] == 0).any() and not (source[1] == 1).any()
    assert torch.equal(source, expected_source)
    for k in range(steps):  # every step's distribution is used somewhere
        assert (source == k).sum() >= 3
    torch.testing.assert_close(target[masked].double(), expected_target[masked], atol=2e-5, rtol=0)
    assert (target[~masked] == 0).all()


def test_pgm_teacher_target_ignores_the_tokens_at_masked_positions():
    teacher = randomized_model("pgm-tiny")
    tokens = batch(teacher)
    schedule = LogLinearSchedule(EPS)
    masked = partition_groups(TIMES, tokens.shape[1], schedule, torch.Generator().manual_seed(1))
    junk = tokens.masked_fill(masked, 7)
    targets = [teacher_target(teacher, x, masked, TIMES, 0.25, 2, schedule, T_MIN, torch.Generator().manual_seed(2))
               for x in (tokens, junk)]
    assert torch.equal(targets[0][0], targets[1][0]) and torch.equal(targets[0][1], targets[1][1])


def test_divergences_equal_closed_forms():
    # student p, teacher q per row; row 2 identical distributions.
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    q = np.array([[0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    ln2 = math.log(2)
    expected = {
        "kl-rev": [0.8 * ln2 + 0.1 * math.log(0.25) + 0.1 * math.log(0.5), 0.0],  # = 0.5 ln 2
        "kl-fwd": [0.4 * math.log(0.5) + 0.4 * math.log(4) + 0.2 * ln2, 0.0],  # = 0.6 ln 2
        "mse": [(ln2**2 + (2 * ln2) ** 2 + ln2**2) / 3, 0.0],
        "tv": [0.5 * (0.4 + 0.3 + 0.1), 0.0],
    }
    assert expected["kl-rev"][0] == pytest.approx(0.5 * ln2) and expected["kl-fwd"][0] == pytest.approx(0.6 * ln2)
    student, teacher = torch.tensor(np.log(p)), torch.tensor(np.log(q))
    assert set(DIVERGENCES) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(DIVERGENCES[name](student, teacher), torch.tensor(values, dtype=torch.float64),
                                   atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
@pytest.mark.parametrize("divergence", ["kl-rev", "tv"])
def test_loss_is_the_summed_divergence_over_the_expected_masked_count(preset, divergence):
    student = randomized_model(preset)
    teacher = randomized_model(preset, seed=1)
    config = SDTTConfig(start_steps=4, teacher_steps=2, min_steps=1, divergence=divergence)
    objective = SDTTObjective(teacher, config)
    tokens = batch(student)
    loss = objective.loss(student, tokens, TIMES, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    masked = partition_groups(TIMES, tokens.shape[1], LogLinearSchedule(EPS), generator)
    target, _ = slow_teacher_target(teacher, tokens, masked, TIMES, 0.25, 2, generator)
    V = student.config.vocab_size
    x = tokens.masked_fill(masked, student.config.mask_id if preset.startswith("mdlm") else 0)
    logits = (student(x, masked) if preset.startswith("pgm") else student(x)).double()[..., :V]
    p_student = (logits - logits.logsumexp(-1, keepdim=True)).exp()[masked].detach().numpy()
    p_teacher = target[masked].exp().numpy()
    if divergence == "kl-rev":
        per_position = (p_student * np.log(p_student / p_teacher)).sum(-1)
    else:
        per_position = 0.5 * np.abs(p_student - p_teacher).sum(-1)
    assert masked.sum() > 20
    expected_count = masked.numel() * (1 - EPS) * (1 + T_MIN) / 2  # E[1 - alpha(t)], t ~ U[t_min, 1)
    assert loss.item() == pytest.approx(per_position.sum() / expected_count, rel=1e-4)


def test_the_expected_masked_fraction_is_the_mean_over_uniform_times():
    t = torch.linspace(T_MIN, 1, 200_001, dtype=torch.float64)
    assert expected_masked_fraction(LogLinearSchedule(EPS), T_MIN) == pytest.approx(
        (1 - LogLinearSchedule(EPS).alpha(t)).mean().item(), rel=1e-6)


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_one_global_batch_gives_the_same_loss_and_gradient_however_it_is_split(preset):
    """1 micro-batch of 4 vs 2 of 2 (the engine averages micro-batches): the same masks and targets
    give the same loss and gradient (fp32, 1e-6), although the halves mask very different counts."""
    torch.manual_seed(0)
    student = randomized_model(preset).float().eval()  # no dropout: the same function twice
    objective = SDTTObjective(randomized_model(preset, seed=1), SDTTConfig(start_steps=4, min_steps=1))
    tokens = batch(student)
    masked = partition_groups(TIMES, tokens.shape[1], objective.schedule, torch.Generator().manual_seed(2))
    noisy = noisy_input(tokens, masked, student.config)
    target, _ = teacher_target(objective.teacher, noisy, masked, TIMES, objective.dt, 2, objective.schedule,
                               T_MIN, torch.Generator().manual_seed(3))
    counts = masked.sum(1)
    assert counts[:2].sum() * 2 < counts[2:].sum()  # low noise first, high noise second

    def loss_and_grad(splits):
        student.zero_grad()
        total = sum(objective.divergence_loss(student, noisy[rows], masked[rows], target[rows]) for rows in splits)
        (total / len(splits)).backward()
        return (total / len(splits)).item(), [p.grad.clone() for p in student.parameters()]

    whole, whole_grad = loss_and_grad([slice(0, 4)])
    halves, halves_grad = loss_and_grad([slice(0, 2), slice(2, 4)])
    assert halves == pytest.approx(whole, abs=1e-6)
    for a, b in zip(whole_grad, halves_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the reference's per-micro-batch mean would not be split-invariant
    per_position = DIVERGENCES["kl-rev"]
    student.zero_grad()
    with torch.no_grad():
        log_p = predictive_log_probs(student, noisy, masked, student.config)
        d = per_position(log_p[masked], target[masked])
    rows = masked.nonzero()[:, 0]
    batchmean_halves = (d[rows < 2].mean() + d[rows >= 2].mean()) / 2
    assert abs(batchmean_halves.item() - d.mean().item()) > 1e-3


def test_the_teacher_runs_in_bf16_when_the_student_does_and_its_target_stays_close():
    """bf16 autocast teacher (weights fp32) against the fp32 one: the same draws give targets whose
    KL from the fp32 ones is small, and the checkpointed weights stay fp32."""
    student = randomized_model("pgm-tiny")
    objective = SDTTObjective.from_student(student, SDTTConfig(start_steps=4, min_steps=1))
    tokens = batch(student)
    masked = partition_groups(TIMES, tokens.shape[1], objective.schedule, torch.Generator().manual_seed(2))
    noisy = noisy_input(tokens, masked, student.config)
    targets = {}
    for autocast in (False, True):
        objective.teacher_autocast = autocast
        with objective._teacher_precision(tokens.device):
            target, _ = teacher_target(objective.teacher, noisy, masked, TIMES, objective.dt, 1,
                                       objective.schedule, T_MIN, torch.Generator().manual_seed(3))
        targets[autocast] = target.float()[masked]
    kl = kl_forward(targets[True], targets[False])
    assert 0 < kl.mean().item() < 1e-3 and kl.max().item() < 1e-2
    assert all(p.dtype == torch.float32 for p in objective.state_dict()["teacher"].values())


def test_distillation_validation_uses_the_pre_training_time_floor():
    objective = SDTTObjective.from_student(randomized_model("pgm-tiny"), SDTTConfig(start_steps=4, min_steps=1))
    assert objective.t_min == 1e-5 and objective.eval_t_min == objective.base.t_min == 1e-3


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_loss_is_zero_for_one_teacher_step_of_the_student_itself_and_not_for_two(preset):
    student = randomized_model(preset)
    tokens = batch(student)
    losses = {}
    for steps in (1, 2):
        config = SDTTConfig(start_steps=2 * steps, teacher_steps=steps, min_steps=1)  # dt = 1/2
        objective = SDTTObjective.from_student(student, config)
        losses[steps] = objective.loss(student, tokens, TIMES, torch.Generator().manual_seed(3)).item()
    assert abs(losses[1]) < 1e-6
    assert losses[2] > 1e-3


def test_gradient_reaches_the_student_only():
    student = randomized_model("pgm-tiny").train()
    objective = SDTTObjective.from_student(student, SDTTConfig(start_steps=4, min_steps=1))
    teacher = objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    assert not any(m is teacher for m in student.modules())
    objective.loss(student, batch(student), TIMES, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_weights_equal(model, weights):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name].to(p.dtype)), name


def test_round_boundary_makes_the_student_the_teacher_and_doubles_dt():
    student = randomized_model("pgm-tiny").train()
    objectives = {source: SDTTObjective.from_student(student, SDTTConfig(
        start_steps=8, teacher_steps=2, round_steps=3, rounds=3, min_steps=1, teacher_source=source))
        for source in ("raw", "ema")}
    initial = params(student)
    ema = EMA(student, 0.9)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    tokens = batch(student)
    weights = {"raw": lambda: params(student), "ema": lambda: ema.shadow}
    for objective in objectives.values():
        assert (objective.dt, objective.sampling_steps(), end_step(objective)) == (1 / 8, 4, 9)
    for step in range(1, 5):
        optimizer.zero_grad()
        objectives["raw"].loss(student, tokens, TIMES, torch.Generator().manual_seed(step)).backward()
        optimizer.step()
        ema.update(student)
        for source, objective in objectives.items():
            assert objective.maybe_advance(step, lambda s: weights[s]()) == (step == 3)
            if step < 3:
                assert_weights_equal(objective.teacher, initial)
            if step == 3:
                assert_weights_equal(objective.teacher, weights[source]())
                assert (objective.round, objective.dt, objective.sampling_steps(), objective.round_start_step) == \
                    (1, 2 / 8, 2, 3)
        if step == 3:
            assert not torch.equal(weights["raw"]()["embed.weight"], ema.shadow["embed.weight"])
            at_boundary = params(objectives["raw"].teacher)
    objective = objectives["raw"]
    assert_weights_equal(objective.teacher, at_boundary)  # step 4 trains the student only
    assert end_step(objective) == 9
    assert objective.maybe_advance(6, lambda s: weights[s]()) and objective.round == 2
    assert not objective.maybe_advance(9, lambda s: weights[s]()) and objective.round == 2  # the last round


def test_num_rounds_stops_at_rounds_or_min_steps():
    teacher = randomized_model("mdlm-tiny")
    for start_steps, m, rounds, min_steps in [(1024, 2, 7, 8), (1024, 2, 20, 8), (1024, 2, 3, 8), (1024, 2, 20, 10),
                                              (12, 3, 9, 1), (12, 3, 9, 3), (8, 1, 9, 1)]:
        config = SDTTConfig(start_steps=start_steps, teacher_steps=m, rounds=rounds, min_steps=min_steps)
        objective = SDTTObjective(teacher, config)
        brute = sum(1 for r in range(rounds) if start_steps / (m * 2**r) >= min_steps)
        assert objective.num_rounds == brute, (start_steps, m, rounds, min_steps)
    assert SDTTObjective(teacher, SDTTConfig.paper()).num_rounds == 7  # 512 -> 8 steps


def test_state_dict_round_trips_through_a_teacher_file(tmp_path):
    student = randomized_model("mdlm-tiny")
    config = SDTTConfig(start_steps=8, teacher_steps=2, round_steps=2, rounds=3, min_steps=1)
    objective = SDTTObjective.from_student(student, config)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.03 * torch.randn_like(p))
    assert objective.maybe_advance(2, lambda source: params(student))
    state = objective.state_dict()
    save_file(state.pop("teacher"), str(tmp_path / TEACHER_FILE))
    state["teacher"] = load_file(str(tmp_path / TEACHER_FILE))

    fresh = SDTTObjective(randomized_model("mdlm-tiny", seed=4), config)
    tokens = batch(student)

    def loss(o):
        return o.loss(student, tokens, TIMES, torch.Generator().manual_seed(9)).item()

    before = loss(fresh)
    fresh.load_state_dict(state)
    assert (fresh.round, fresh.dt, fresh.round_start_step, end_step(fresh)) == (1, 0.25, 2, 6)
    assert loss(fresh) == loss(objective) != before
    with pytest.raises(ValueError, match="same values"):
        SDTTObjective(student, SDTTConfig(start_steps=16, min_steps=1)).load_state_dict(state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_steps=1000), "power of two times the teacher steps"),
    (dict(start_steps=9, teacher_steps=3, min_steps=1), "power of two times the teacher steps"),
    (dict(start_steps=2, teacher_steps=4, min_steps=1), "power of two times the teacher steps"),
    (dict(start_steps=16, min_steps=16), "no round to run"),
    (dict(divergence="kl"), "unknown divergence"),
    (dict(teacher_source="best"), "unknown teacher source"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDTTConfig(**kwargs)
    SDTTConfig(start_steps=12, teacher_steps=3, min_steps=1)  # 3 x 4: valid
