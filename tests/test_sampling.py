import pytest
import torch

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


def test_naive_and_uniform_agree_step_by_step(pgm_model):
    logs = {}
    samples = {}
    for mode in ("uniform", "naive"):
        logs[mode] = []
        samples[mode] = sample_pgm(pgm_model, 3, 6, mode=mode, prompt=[(10, 4)], callback=_record(logs[mode]),
                                   generator=torch.Generator().manual_seed(1))
    assert len(logs["uniform"]) == len(logs["naive"]) == 6
    for (s1, p1, l1, _), (s2, p2, l2, _) in zip(logs["uniform"], logs["naive"]):
        assert s1 == s2 and torch.equal(p1, p2)
        assert (l1 - l2).abs().max().item() < 1e-4
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
    assert torch.equal(out, draw(0)) and not torch.equal(out, draw(1))
    assert (draw(2, steps=1) != cfg.mask_id).all()


def test_mdlm_sampler_skips_forward_passes_of_steps_that_reveal_nothing(mdlm_model):
    calls = []
    handle = mdlm_model.register_forward_hook(lambda *a: calls.append(1))
    steps = 500  # far more steps than positions: most reveal nothing
    sample_mdlm(mdlm_model, 1, steps, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) <= mdlm_model.config.seq_len


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
    with pytest.raises(ValueError, match="prompts for a batch"):
        sample_pgm(pgm_model, 2, 4, prompt=[[(1, 1)], [(2, 2)], [(3, 3)]])
