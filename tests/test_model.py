import pytest
import torch

from pgm_dist import ModelConfig, build_model, count_parameters
from tests.conftest import randomized_model


def _groups_cases(L: int):
    g = torch.Generator().manual_seed(1)
    rand = torch.rand(3, L, generator=g) < 0.5
    return {
        "random": rand,
        "group1_empty": torch.zeros(3, L, dtype=torch.bool),
        "group0_empty": torch.ones(3, L, dtype=torch.bool),
        "mixed_rows": torch.stack([rand[0], torch.zeros(L, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]),
    }


@pytest.mark.parametrize("case", ["random", "group1_empty", "group0_empty", "mixed_rows"])
@pytest.mark.parametrize("swap", [False, True])
def test_information_does_not_cross_the_partition(pgm_model, case, swap):
    L, V = pgm_model.config.seq_len, pgm_model.config.vocab_size
    groups = _groups_cases(L)[case]
    if swap:
        groups = ~groups
    tokens = torch.randint(0, V, groups.shape, generator=torch.Generator().manual_seed(2))
    changed = torch.where(groups, (tokens + 1 + torch.randint_like(tokens, V - 1)) % V, tokens)
    with torch.no_grad():
        before, after = pgm_model(tokens, groups), pgm_model(changed, groups)
    delta = (after - before).abs().amax(-1)  # [B, L]
    # Changing the tokens of group 1 changes no group-1 logit ...
    assert delta[groups].max().item() < 1e-5 if groups.any() else True
    # ... and does change the group-0 logits of every sequence that has both groups.
    for b in range(groups.shape[0]):
        if groups[b].any() and (~groups[b]).any():
            assert delta[b][~groups[b]].min().item() > 1e-4


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


def test_mdlm_mask_logit_is_minus_infinity(mdlm_model):
    cfg = mdlm_model.config
    x = torch.randint(0, cfg.vocab_size + 1, (2, cfg.seq_len))
    with torch.no_grad():
        logits = mdlm_model(x)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size + 1)
    assert cfg.mask_id == cfg.vocab_size
    assert torch.isneginf(logits[..., cfg.mask_id]).all()
    assert torch.isfinite(logits[..., : cfg.vocab_size]).all()


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


@pytest.mark.parametrize("preset,millions", [
    ("pgm-small", 172), ("pgm-8-8", 203), ("pgm-6-6-d1024", 268), ("mdlm-small", 170),
])
def test_parameter_counts_match_the_paper(preset, millions):
    with torch.device("meta"):
        model = build_model(ModelConfig.preset(preset, vocab_size=50258, seq_len=1024))
    assert abs(count_parameters(model) / 1e6 - millions) / millions < 0.02


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
