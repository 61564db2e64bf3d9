import math

import pytest
import torch

from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.layers import Rotary, apply_rotary
from tests.helpers.models import randomized_model


def _perturbed_sets(L: int) -> dict[str, torch.Tensor]:
    """[3, L] sets of positions whose tokens a case changes: non-empty in every row."""
    g = torch.Generator().manual_seed(1)
    half = torch.rand(3, L, generator=g) < 0.5
    single = torch.zeros(3, L, dtype=torch.bool)
    single[torch.arange(3), torch.tensor([0, 17, L - 1])] = True
    return {
        "random_half": half,
        "single_position": single,
        "everything": torch.ones(3, L, dtype=torch.bool),  # the other group is empty
        "mixed_rows": torch.stack([half[0], single[1], torch.ones(L, dtype=torch.bool)]),
    }


@pytest.mark.parametrize("case", ["random_half", "single_position", "everything", "mixed_rows"])
@pytest.mark.parametrize("perturbed_group", [1, 0])
def test_information_does_not_cross_the_partition(pgm_model, case, perturbed_group):
    L, V = pgm_model.config.seq_len, pgm_model.config.vocab_size
    perturbed = _perturbed_sets(L)[case]
    assert perturbed.any(dim=1).all()
    groups = perturbed if perturbed_group == 1 else ~perturbed
    tokens = torch.randint(0, V, groups.shape, generator=torch.Generator().manual_seed(2))
    changed = torch.where(perturbed, (tokens + 1 + torch.randint_like(tokens, V - 1)) % V, tokens)
    with torch.no_grad():
        before, after = pgm_model(tokens, groups), pgm_model(changed, groups)
    delta = (after - before).abs().amax(-1)  # [B, L]
    # Changing tokens of one group changes no logit of that group ...
    assert delta[perturbed].max().item() < 1e-5
    # ... and does change every logit of the other group, where it is non-empty.
    for b in range(groups.shape[0]):
        if (~perturbed[b]).any():
            assert delta[b][~perturbed[b]].min().item() > 1e-4


def test_group_logits_do_not_depend_on_own_tokens_in_empty_other_group(pgm_model):
    """With group 0 empty, the group-1 logits see no token at all: a constant per position."""
    L, V = pgm_model.config.seq_len, pgm_model.config.vocab_size
    groups = torch.ones(2, L, dtype=torch.bool)
    tokens = torch.randint(0, V, (2, L))
    with torch.no_grad():
        logits = pgm_model(tokens, groups)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def _subset(mask_row: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    idx = mask_row.nonzero().squeeze(1)
    return idx[torch.randperm(idx.numel(), generator=g)[:size]]


def test_predict_equals_full_forward_at_query_rows(pgm_model):
    L, V = pgm_model.config.seq_len, pgm_model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    B, C, Q = 4, 20, 9
    groups = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):  # a different set of C clean positions in every sequence
        groups[b, torch.randperm(L, generator=g)[:C]] = False
    tokens = torch.randint(0, V, (B, L), generator=g)
    clean_pos = torch.stack([(~groups[b]).nonzero().squeeze(1) for b in range(B)])
    clean_pos = clean_pos[:, torch.randperm(C, generator=g)]  # order of the clean set is irrelevant
    query_pos = torch.stack([_subset(groups[b], Q, g) for b in range(B)])
    with torch.no_grad():
        full = pgm_model(tokens, groups)
        fast = pgm_model.predict(tokens.gather(1, clean_pos), clean_pos, query_pos)
    expected = full.gather(1, query_pos[..., None].expand(-1, -1, V))
    assert fast.shape == (B, Q, V)
    assert (fast - expected).abs().max().item() < 1e-4


def test_predict_with_padded_clean_sets_equals_unpadded(pgm_model):
    L, V = pgm_model.config.seq_len, pgm_model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([5, 17, 11])
    C, Q = int(lengths.max()), 6
    tokens = torch.randint(0, V, (3, C), generator=g)
    positions = torch.stack([torch.randperm(L, generator=g)[:C] for _ in range(3)])
    queries = torch.stack([torch.randperm(L, generator=g)[:Q] for _ in range(3)])
    with torch.no_grad():
        padded = pgm_model.predict(tokens, positions, queries, clean_lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = pgm_model.predict(tokens[b:b + 1, :n], positions[b:b + 1, :n], queries[b:b + 1])
            assert (padded[b] - alone[0]).abs().max().item() < 1e-4


def test_mdlm_logits_have_no_mask_column(mdlm_model):
    cfg = mdlm_model.config
    x = torch.randint(0, cfg.vocab_size + 1, (2, cfg.seq_len))
    with torch.no_grad():
        logits = mdlm_model(x)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert cfg.mask_id == cfg.vocab_size
    assert torch.isfinite(logits).all()


def test_fresh_model_predicts_uniform_distribution():
    """Zero-initialised output layer: every logit is 0 at initialisation."""
    model = build_model(ModelConfig.preset("pgm-tiny", vocab_size=50, seq_len=16)).eval()
    logits = model(torch.randint(0, 50, (2, 16)), torch.rand(2, 16) < 0.5)
    assert logits.abs().max().item() == 0.0


def test_dropout_is_active_in_training_only(pgm_model):
    tokens = torch.randint(0, 61, (2, 48))
    groups = torch.rand(2, 48) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(pgm_model(tokens, groups), pgm_model(tokens, groups))
        pgm_model.train()
        assert (pgm_model(tokens, groups) - pgm_model(tokens, groups)).abs().max() > 1e-4


def test_class_conditional_model_uses_labels():
    model = randomized_model("pgm-tiny", num_classes=10)
    tokens, groups = torch.randint(0, 61, (2, 48)), torch.rand(2, 48) < 0.5
    with torch.no_grad():
        a = model(tokens, groups, labels=torch.tensor([1, 2]))
        b = model(tokens, groups, labels=torch.tensor([3, 2]))
    assert (a[0] - b[0]).abs().max() > 1e-4
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(tokens, groups)


def _expected_parameters(c: ModelConfig) -> int:
    """Section 3 counted by hand: linear layers ``in * out (+ out)``, LayerNorms ``2d`` where affine."""
    d, hidden, V = c.d_model, c.mlp_ratio * c.d_model, c.vocab_size
    attention = d * d + d * 2 * d + d * d  # q, kv, out projections, no biases
    block = attention + (d * hidden + hidden) + (hidden * d + d) + (c.cond_dim * 6 * d + 6 * d)
    output = (c.cond_dim * 2 * d + 2 * d) + (d * V + V)
    if c.arch == "mdlm":
        return (V + 1) * d + c.cond_dim + c.n_enc * block + output  # + the MASK embedding row
    group_swap = d + 2 * d + attention  # seed, LayerNorm, attention
    decoder_block = block + 2 * d  # + the LayerNorm on the memory
    return V * d + c.cond_dim + c.n_enc * block + group_swap + c.n_dec * decoder_block + output


@pytest.mark.parametrize("preset,millions", [
    ("pgm-tiny", 14.2), ("pgm-small", 171.9), ("pgm-8-8", 202.6), ("pgm-6-6-d1024", 268.0),
    ("mdlm-tiny", 14.1), ("mdlm-small", 169.6), ("pgm-medium", 428.6), ("mdlm-medium", 424.4),
    ("pgm-1b", 1108.6), ("mdlm-1b", 1099.1),
])
def test_parameter_counts_are_exact_and_match_the_paper(preset, millions):
    """Exact against the formula; to 0.1M against the README table (the paper's 172M, 203M,
    268M and ~170M for the small presets)."""
    config = ModelConfig.preset(preset, vocab_size=50258, seq_len=1024)
    with torch.device("meta"):
        model = build_model(config)
    assert count_parameters(model) == _expected_parameters(config)
    assert round(count_parameters(model) / 1e6, 1) == millions


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="pgm-tiny"):
        ModelConfig.preset("pgm-huge", vocab_size=10, seq_len=8)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig.preset("pgm-tiny", vocab_size=10, seq_len=8, width=3)
    with pytest.raises(ValueError, match="reference"):
        ModelConfig.preset("pgm-tiny", vocab_size=10, seq_len=8, attention="fastest")
    with pytest.raises(ValueError, match="positive"):
        ModelConfig.preset("pgm-tiny", vocab_size=0, seq_len=8)


def test_config_round_trips_through_a_dict():
    cfg = ModelConfig.preset("pgm-small", vocab_size=100, seq_len=64, dropout=0.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_enc == 6 and cfg.head_dim == 64 and cfg.dropout == 0.0


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_initialisation_follows_the_reference(preset):
    """Embedding uniform in +-1/sqrt(d) (std 1/sqrt(3d)); GroupSwap seed N(0, 1)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, vocab_size=4000, seq_len=16, d_model=1024, n_heads=16))
    d = model.config.d_model
    embed = model.embed.weight.detach()
    assert abs(embed.std().item() * math.sqrt(3 * d) - 1) < 0.1
    assert embed.abs().max().item() <= 1 / math.sqrt(d)
    if preset.startswith("pgm"):
        assert abs(model.group_swap.query_seed.detach().std().item() - 1) < 0.1  # 1024 draws: se 0.022


def test_rotary_frequencies_stay_float32_in_a_bf16_model():
    model = build_model(ModelConfig.preset("pgm-tiny", vocab_size=50, seq_len=1024))
    positions = torch.arange(1024)[None]
    cos32, sin32 = model.rotary(positions)
    cos16, sin16 = model.to(torch.bfloat16).rotary(positions)
    assert cos16.dtype == sin16.dtype == torch.float32
    assert torch.equal(cos16, cos32) and torch.equal(sin16, sin32)


def test_rotary_scores_depend_only_on_the_relative_position():
    """q.k after RoPE equals sum_p Re(zq_p conj(zk_p) exp(1j (i - j) theta_p)), with pairs
    z_p = x[p] + 1j x[p + D/2] (NeoX) and theta_p = 10000^(-2p/D)."""
    D, n = 64, 200
    g = torch.Generator().manual_seed(5)
    i, j = torch.randint(0, 1024, (2, 1, n), generator=g)
    q, k = torch.randn(2, 1, 1, n, D, generator=g)  # [B=1, H=1, n, D] each
    rotary = Rotary(D, 10000.0)
    scores = (apply_rotary(q, rotary(i)) * apply_rotary(k, rotary(j))).sum(-1).flatten().double()
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    zq, zk = (torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()).flatten(0, 2) for x in (q, k))
    expected = (zq * zk.conj() * torch.exp(1j * (i - j).flatten()[:, None].double() * theta)).real.sum(-1)
    assert scores.abs().mean() > 1
    torch.testing.assert_close(scores, expected, atol=5e-3, rtol=0)  # float32 angles up to 1023
