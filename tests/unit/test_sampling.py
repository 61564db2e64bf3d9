import math

import pytest
import torch

from pgm_dist.models.config import ModelConfig
from pgm_dist.objectives import LogLinearSchedule
from pgm_dist.sampling import sample_categorical, sample_mdlm, sample_pgm, top_p_filter


def _record(log):
    def callback(step, positions, logits, valid):
        log.append((step, positions.clone(), logits.clone(), valid.clone()))
    return callback


@pytest.mark.parametrize("mode", ["uniform", "binomial"])
def test_every_position_is_written_once_and_prompts_are_kept(pgm_model, mode):
    L = pgm_model.config.seq_len
    prompt = [[(3, 11), (40, 12)], [(7, 13)], []]  # a different number of prompt tokens per sequence
    log = []
    out = sample_pgm(pgm_model, 3, 9, mode=mode, prompt=prompt, callback=_record(log),
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, L)
    assert (out[:, 0] == pgm_model.config.bos_id).all()
    assert out[0, 3] == 11 and out[0, 40] == 12 and out[1, 7] == 13
    for b, pairs in enumerate(prompt):
        written = [p for _, pos, _, valid in log for p in pos[b][valid[b]].tolist()]
        known = [0] + [p for p, _ in pairs]
        assert sorted(written + known) == list(range(L))


def test_uniform_sampler_reveals_near_equal_chunks(pgm_model):
    log = []
    sample_pgm(pgm_model, 2, 5, callback=_record(log), generator=torch.Generator().manual_seed(0))
    sizes = [int(valid[0].sum()) for _, _, _, valid in log]
    assert sum(sizes) == 47 and max(sizes) - min(sizes) <= 1 and len(sizes) == 5


@pytest.mark.parametrize("prompt", [[(10, 4)], [[(10, 4), (11, 5)], [(30, 7)], []]], ids=["shared", "per_sequence"])
def test_naive_and_uniform_agree_step_by_step(pgm_model, prompt):
    """Per-sequence prompts of different lengths take the padded path (``clean_lengths``)."""
    logs = {}
    samples = {}
    for mode in ("uniform", "naive"):
        logs[mode] = []
        samples[mode] = sample_pgm(pgm_model, 3, 6, mode=mode, prompt=prompt, callback=_record(logs[mode]),
                                   generator=torch.Generator().manual_seed(1))
    assert len(logs["uniform"]) == len(logs["naive"]) == 6
    for (s1, p1, l1, v1), (s2, p2, l2, v2) in zip(logs["uniform"], logs["naive"]):
        assert s1 == s2 and torch.equal(p1, p2) and torch.equal(v1, v2)
        assert (l1 - l2)[v1].abs().max().item() < 1e-4
    assert torch.equal(samples["uniform"], samples["naive"])


def test_pgm_sampling_is_reproducible_with_a_generator(pgm_model):
    def draw(seed):
        return sample_pgm(pgm_model, 2, 4, top_p=0.9, temperature=0.8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_mdlm_samples_contain_no_mask_and_are_reproducible(mdlm_model):
    cfg = mdlm_model.config

    def draw(seed, steps=8):
        return sample_mdlm(mdlm_model, 3, steps, generator=torch.Generator().manual_seed(seed))

    out = draw(0)
    assert out.shape == (3, cfg.seq_len)
    assert (out != cfg.mask_id).all() and (out < cfg.vocab_size).all()
    assert (out[:, 0] == cfg.bos_id).all()
    assert torch.equal(out, draw(0)) and not torch.equal(out, draw(1))
    assert (draw(2, steps=1) != cfg.mask_id).all()


class _CountingNetwork(torch.nn.Module):
    """A stand-in network that records its inputs and whose logits name the number of
    MASKs (MDLM) or clean tokens (PGM) it was given: every position's argmax is that
    count mod V, so a drawn token tells which forward pass produced it."""

    def __init__(self, preset: str):
        super().__init__()
        self.config = ModelConfig.preset(preset, vocab_size=50, seq_len=48)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # the samplers read the device from a parameter
        self.inputs = []

    def _logits(self, count, rows):  # count [B] -> [B, rows, V] float32
        V = self.config.vocab_size
        return 10.0 * torch.nn.functional.one_hot(count % V, V).float()[:, None].expand(-1, rows, -1)

    def forward(self, x, labels=None):  # MDLM
        self.inputs.append(x.clone())
        return self._logits((x == self.config.mask_id).sum(1), x.shape[1])

    def predict(self, clean_tokens, clean_positions, query_positions, clean_lengths=None, labels=None):  # PGM
        self.inputs.append(clean_tokens.clone())
        count = torch.full((clean_tokens.shape[0],), clean_tokens.shape[1]) if clean_lengths is None else clean_lengths
        return self._logits(count, query_positions.shape[1])


def _assert_binomial(revealed: int, remaining: int, p: float):
    """``revealed`` of ``remaining`` Binomial(p) draws: within 5 standard errors of the mean."""
    assert abs(revealed - remaining * p) < 5 * math.sqrt(remaining * p * (1 - p)), (revealed, remaining, p)


def _step_probability(step: int, steps: int) -> float:
    return LogLinearSchedule().reveal_probability(1 - step / steps, 1 - (step + 1) / steps)


def test_binomial_pgm_sampler_reveals_remaining_times_the_step_probability():
    net, B, steps = _CountingNetwork("pgm-tiny"), 256, 8
    log = []
    sample_pgm(net, B, steps, mode="binomial", temperature=0, callback=_record(log),
               generator=torch.Generator().manual_seed(0))
    assert [step for step, *_ in log] == list(range(steps))
    remaining = torch.full((B,), 47)
    for step, _, _, valid in log:
        revealed = valid.sum(1)
        if step < steps - 1:
            _assert_binomial(int(revealed.sum()), int(remaining.sum()), _step_probability(step, steps))
        else:
            assert torch.equal(revealed, remaining)
        remaining = remaining - revealed


def test_mdlm_sampler_reveals_remaining_times_the_step_probability_with_one_pass_per_step():
    """With B L >> steps every step reveals something: exactly ``steps`` passes, each on
    the state after the previous step's reveals, BOS kept at position 0."""
    net, B, steps = _CountingNetwork("mdlm-tiny"), 256, 8
    out = sample_mdlm(net, B, steps, temperature=0, generator=torch.Generator().manual_seed(0))
    mask_id = net.config.mask_id
    assert len(net.inputs) == steps
    states = net.inputs + [out]
    assert all((x[:, 0] == net.config.bos_id).all() for x in states)
    assert (states[0][:, 1:] == mask_id).all() and (out != mask_id).all()
    for step in range(steps - 1):
        masked = int((states[step] == mask_id).sum())
        _assert_binomial(masked - int((states[step + 1] == mask_id).sum()), masked, _step_probability(step, steps))


def test_mdlm_sampler_runs_the_network_only_for_steps_that_reveal_something():
    """steps >> L: most steps reveal nothing and cost no pass; every pass sees a new state,
    and the tokens a step reveals come from the logits of that step's pass."""
    net = _CountingNetwork("mdlm-tiny")
    mask_id, V = net.config.mask_id, net.config.vocab_size
    out = sample_mdlm(net, 1, 500, temperature=0, generator=torch.Generator().manual_seed(0))
    states = net.inputs + [out]
    masked = [int((x == mask_id).sum()) for x in states]
    assert masked[0] == 47 and masked[-1] == 0 and len(net.inputs) <= 47
    assert all(a > b for a, b in zip(masked, masked[1:]))  # no pass without a reveal since the last one
    for before, after, count in zip(states, states[1:], masked):
        revealed = (before == mask_id) & (after != mask_id)
        assert (after[revealed] == count % V).all()


@pytest.mark.parametrize("mode", ["uniform", "binomial"])
def test_pgm_draws_at_temperature_zero_are_the_argmax(pgm_model, mode):
    log = []
    out = sample_pgm(pgm_model, 3, 5, mode=mode, temperature=0, callback=_record(log),
                     generator=torch.Generator().manual_seed(0))
    for _, positions, logits, valid in log:
        drawn = out.gather(1, positions)
        assert torch.equal(drawn[valid], logits.argmax(-1)[valid])


def test_mdlm_draws_at_temperature_zero_are_the_argmax(mdlm_model):
    passes = []
    handle = mdlm_model.register_forward_hook(lambda _, args, logits: passes.append((args[0].clone(), logits)))
    out = sample_mdlm(mdlm_model, 3, 6, temperature=0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    mask_id = mdlm_model.config.mask_id
    for (x, logits), after in zip(passes, [x for x, _ in passes[1:]] + [out]):
        revealed = (x == mask_id) & (after != mask_id)
        assert revealed.any() and torch.equal(after[revealed], logits.argmax(-1)[revealed])


def test_gumbel_max_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(40000, 4)
    draws = sample_categorical(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)
    assert sample_categorical(logits[:3], temperature=0).tolist() == [0, 0, 0]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.1, 0.5, 0.25, 0.15]]).log().double()
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, True, False]]  # 0.5 + 0.25 >= 0.7
    assert torch.isfinite(top_p_filter(logits, 0.4)).sum() == 1  # the top token always stays


def test_bad_arguments_are_refused(pgm_model):
    with pytest.raises(ValueError, match="uniform"):
        sample_pgm(pgm_model, 1, 4, mode="greedy")
    with pytest.raises(ValueError, match="outside"):
        sample_pgm(pgm_model, 1, 4, prompt=[(999, 1)])
    with pytest.raises(ValueError, match="position 0 holds BOS"):
        sample_pgm(pgm_model, 2, 4, prompt=[[(3, 1)], [(0, 5)]])
    with pytest.raises(ValueError, match="prompts for a batch"):
        sample_pgm(pgm_model, 2, 4, prompt=[[(1, 1)], [(2, 2)], [(3, 3)]])
