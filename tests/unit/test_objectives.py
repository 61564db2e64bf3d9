import math

import pytest
import torch

from pgm_dist.evaluation.nelbo import nelbo_sums
from pgm_dist.objectives import (
    T_MIN,
    LogLinearSchedule,
    MDLMObjective,
    PGMObjective,
    global_sample_indices,
    low_discrepancy_times,
    partition_groups,
    shared_uniform,
)

EPS = 1e-3


def test_weights_equal_closed_forms():
    s = LogLinearSchedule(eps=EPS)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), 1 - (1 - EPS) * t)
    torch.testing.assert_close(s.group1_weight(t), 1 / t)  # (1-eps)/(1-alpha(t)) = 1/t
    for ti, w0 in zip(t.tolist(), s.group0_weight(t).tolist()):
        assert w0 == pytest.approx((1 - EPS) / (1 - (1 - EPS) * ti), rel=1e-12)
    # Bounded by 1/eps where the reference code's 1/(1-t) is infinite.
    assert s.group0_weight(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx((1 - EPS) / EPS)


def test_reveal_probability_of_log_linear_schedule():
    s = LogLinearSchedule(eps=EPS)
    # (alpha(s) - alpha(t)) / (1 - alpha(t)) = (t - s) / t for this schedule
    assert s.reveal_probability(0.75, 0.5) == pytest.approx(1 / 3)
    assert s.reveal_probability(1.0, 0.0) == pytest.approx(1.0)


def test_times_of_two_ranks_and_two_micro_steps_form_the_low_discrepancy_set():
    micro_batch, world, accum, t_min = 3, 2, 2, 1e-5  # distillation's floor
    n = micro_batch * world * accum
    u = shared_uniform(seed=7, step=11)
    assert u == shared_uniform(seed=7, step=11) and u != shared_uniform(seed=7, step=12)
    indices, times = [], []
    for rank in range(world):  # two simulated ranks, each with two accumulation steps
        for micro_step in range(accum):
            idx = global_sample_indices(micro_batch, rank, world, micro_step)
            indices.append(idx)
            times.append(low_discrepancy_times(u, idx, n, t_min))
    assert sorted(torch.cat(indices).tolist()) == list(range(n))
    t = torch.cat(times).double()
    assert t.min() >= t_min and t.max() <= 1.0
    fractions = ((t - t_min) / (1 - t_min)).sort().values
    # n points with spacing exactly 1/n, the first at (u mod 1/n).
    torch.testing.assert_close(fractions.diff(), torch.full((n - 1,), 1 / n, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert fractions[0].item() == pytest.approx(math.fmod(u, 1 / n), abs=1e-6)


def test_the_objective_sets_the_time_floor_of_the_evaluation(pgm_model):
    """``nelbo_sums`` draws t in [objective.t_min, 1], not in a module-wide range."""

    class Recording(PGMObjective):
        def nelbo(self, model, tokens, t, generator=None):
            seen.append(t)
            return super().nelbo(model, tokens, t, generator)

    assert PGMObjective().t_min == MDLMObjective(mask_id=0).t_min == T_MIN
    seen = []
    batches = [torch.randint(0, 61, (8, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    nelbo_sums(pgm_model, Recording(t_min=0.9), batches, torch.device("cpu"), seed=0)
    t = torch.cat(seen)
    # 8 stratified times per batch: one in every eighth of [0.9, 1]
    assert t.min() >= 0.9 and t.max() <= 1.0 and t.max() - t.min() > 0.08


def test_partition_groups_follow_the_schedule():
    s = LogLinearSchedule()
    t = torch.tensor([0.0, 0.25, 0.75, 1.0])
    groups = partition_groups(t, 20000, s, torch.Generator().manual_seed(0))
    rate = groups.float().mean(1)
    torch.testing.assert_close(rate, 1 - s.alpha(t), atol=0.015, rtol=0)


class _FixedLogits(torch.nn.Module):
    """A "model" whose logits are fixed, to check the loss arithmetic alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, groups=None, targets=None, weights=None):  # -> sum(weights * nll), as the networks
        nll = torch.nn.functional.cross_entropy(self.logits.transpose(1, 2), targets, reduction="none")
        return (weights * nll).sum()


def _direct_nll(logits, tokens, b, i):
    row = logits[b, i].double()
    return (torch.logsumexp(row, 0) - row[tokens[b, i]]).item()


def test_pgm_loss_equals_direct_per_token_computation():
    B, L, V = 3, 10, 7
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(B, L, V, generator=g), torch.randint(0, V, (B, L), generator=g)
    t = torch.tensor([0.05, 0.5, 0.999])
    model, objective = _FixedLogits(logits), PGMObjective()
    loss = objective.loss(model, tokens, t, torch.Generator().manual_seed(9))
    total, count = objective.nelbo(model, tokens, t, torch.Generator().manual_seed(9))
    groups = partition_groups(t, L, LogLinearSchedule(), torch.Generator().manual_seed(9))
    expected_loss = expected_nelbo = 0.0
    for b in range(B):
        tb = t[b].item()
        for i in range(L):
            nll = _direct_nll(logits, tokens, b, i)
            if groups[b, i]:
                expected_loss += nll / tb
                expected_nelbo += nll / tb
            else:
                expected_loss += nll * (1 - EPS) / (1 - (1 - EPS) * tb)
    assert loss.item() == pytest.approx(expected_loss / (2 * B * L), rel=1e-5)
    assert count == B * L
    assert total.item() == pytest.approx(expected_nelbo, rel=1e-5)


def test_mdlm_loss_equals_direct_per_token_computation():
    B, L, V = 2, 12, 5
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, L, V, generator=g)
    tokens = torch.randint(0, V, (B, L), generator=g)
    t = torch.tensor([0.3, 0.8])
    seen = {}

    def model(noisy, targets, weights):
        seen["noisy"] = noisy
        return _FixedLogits(logits)(noisy, targets=targets, weights=weights)

    loss = MDLMObjective(mask_id=V).loss(model, tokens, t, torch.Generator().manual_seed(2))
    masked = seen["noisy"] == V
    assert masked.any() and (seen["noisy"][~masked] == tokens[~masked]).all()
    expected = sum(_direct_nll(logits, tokens, b, i) / t[b].item()
                   for b in range(B) for i in range(L) if masked[b, i])
    assert loss.item() == pytest.approx(expected / (B * L), rel=1e-5)


def test_pgm_loss_is_finite_at_the_ends_of_time(pgm_model):
    tokens = torch.randint(0, 61, (2, 48))
    loss = PGMObjective().loss(pgm_model, tokens, torch.tensor([T_MIN, 1.0]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in pgm_model.parameters() if p.grad is not None)
