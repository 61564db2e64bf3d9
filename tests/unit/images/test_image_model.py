"""The image PGM (registers, class conditioning without SiLU) and the image objective (arccos
partition, BOS in group 0, unweighted mean cross-entropy, label dropout)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgm_dist.images.objective import ImageObjective, arccos_group1_probability
from pgm_dist.models.config import ModelConfig
from tests.helpers.models import randomized_model
from tests.unit.models.test_model import _perturbed_sets

CODEBOOK, CLASSES, GRID = 17, 10, (8, 8)
L = 1 + GRID[0] * GRID[1]


@pytest.fixture(scope="module", params=["reference", "legacy"])
def model(request):
    """Both register orders: group 1's register at position 0 (the reference's) and group 0's."""
    return randomized_model("pgm-img-tiny", vocab_size=CODEBOOK + 1, seq_len=L, num_classes=CLASSES,
                            image_grid=list(GRID), register_order=request.param)


def test_register_order_is_the_references_and_an_older_model_keeps_its_own():
    config = ModelConfig.preset("pgm-img-tiny", vocab_size=CODEBOOK + 1, seq_len=L, num_classes=CLASSES,
                                image_grid=list(GRID))
    assert config.register_order == "reference"
    old = {k: v for k, v in config.to_dict().items() if k != "register_order"}  # saved before the field
    assert ModelConfig.from_dict(old).register_order == "legacy"
    assert ModelConfig.from_dict(config.to_dict()).register_order == "reference"
    reference = randomized_model("pgm-img-tiny", vocab_size=CODEBOOK + 1, seq_len=L, num_classes=CLASSES,
                                 image_grid=list(GRID))
    legacy = randomized_model("pgm-img-tiny", vocab_size=CODEBOOK + 1, seq_len=L, num_classes=CLASSES,
                              image_grid=list(GRID), register_order="legacy")
    legacy.load_state_dict(reference.state_dict())
    tokens, groups = _tokens(2), torch.rand(2, L, generator=torch.Generator().manual_seed(1)) < 0.5
    groups[:, 0] = False
    with torch.no_grad():  # the same weights, the registers at each other's positions: another function
        assert (reference(tokens, groups, labels=torch.tensor([1, 2]))
                - legacy(tokens, groups, labels=torch.tensor([1, 2]))).abs().max() > 1e-3


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, CODEBOOK, (n, L), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = CODEBOOK  # BOS
    return tokens


@pytest.mark.parametrize("case", ["random_half", "single_position", "everything", "mixed_rows"])
@pytest.mark.parametrize("perturbed_group", [1, 0])
def test_information_does_not_cross_the_partition_with_registers_and_classes(model, case, perturbed_group):
    perturbed = _perturbed_sets(L)[case]
    groups = perturbed if perturbed_group == 1 else ~perturbed
    tokens = _tokens(3)
    changed = torch.where(perturbed, (tokens + 1 + torch.randint_like(tokens, CODEBOOK - 1)) % CODEBOOK, tokens)
    labels = torch.tensor([0, 4, CLASSES])
    with torch.no_grad():
        delta = (model(changed, groups, labels=labels) - model(tokens, groups, labels=labels)).abs().amax(-1)
    assert delta[perturbed].max().item() < 1e-5
    for b in range(3):
        if (~perturbed[b]).any():
            assert delta[b][~perturbed[b]].min().item() > 1e-4


def test_each_register_informs_only_the_other_group_and_the_label_every_position(model):
    groups = torch.rand(2, L, generator=torch.Generator().manual_seed(3)) < 0.5
    groups[:, 0] = False
    tokens, labels = _tokens(2), torch.tensor([1, 2])
    with torch.no_grad():
        base = model(tokens, groups, labels=labels)
        for register, informed in ((0, groups), (1, ~groups)):  # register r is group r's
            model.registers.tokens[register].add_(0.5)
            delta = (model(tokens, groups, labels=labels) - base).abs().amax(-1)
            model.registers.tokens[register].sub_(0.5)
            assert delta[~informed].max().item() < 1e-5  # its own group: untouched
            assert delta[informed].min().item() > 1e-4
        other = (model(tokens, groups, labels=torch.tensor([3, CLASSES])) - base).abs().amax(-1)
    assert other.min().item() > 1e-4  # a class (or the null label) moves every logit


def test_conditioning_is_the_raw_class_embedding_of_width_d_without_silu(model):
    assert model.config.cond_dim == model.config.d_model and not model.config.cond_silu
    labels = torch.tensor([0, 5, CLASSES])
    c = model.cond(labels)
    torch.testing.assert_close(c, model.cond.classes.weight[labels])
    for modulation in (model.encoder[0].modulation, model.output.modulation):
        linear = modulation[1]
        torch.testing.assert_close(modulation(c), F.linear(c, linear.weight, linear.bias))
    text = randomized_model("pgm-tiny")
    c = text.cond()
    linear = text.encoder[0].modulation[1]
    torch.testing.assert_close(text.encoder[0].modulation(c), F.linear(F.silu(c), linear.weight, linear.bias))


def test_sampling_path_equals_the_training_path_with_registers_and_padding(model):
    """Encode the clean set (with group 0's register) and decode the queries only == the full
    forward with the queries in group 1, also with padded clean sets of unequal lengths."""
    tokens, labels = _tokens(2, seed=5), torch.tensor([2, CLASSES])
    g = torch.Generator().manual_seed(6)
    groups = torch.rand(2, L, generator=g) < torch.tensor([[0.3], [0.8]])
    groups[:, 0] = False
    with torch.no_grad():
        full = model(tokens, groups, labels=labels)
        clean = [(~groups[b]).nonzero().flatten() for b in range(2)]
        query = [groups[b].nonzero().flatten()[:5] for b in range(2)]
        width = max(c.numel() for c in clean)
        clean_pos = torch.stack([F.pad(c, (0, width - c.numel())) for c in clean])
        lengths = torch.tensor([c.numel() for c in clean])
        predicted = model.predict(tokens.gather(1, clean_pos), clean_pos, torch.stack(query),
                                  clean_lengths=lengths, labels=labels)
    for b in range(2):
        torch.testing.assert_close(predicted[b], full[b, query[b]], atol=1e-5, rtol=0)


def test_image_grid_must_fill_the_sequence():
    with pytest.raises(ValueError, match="image_grid"):
        ModelConfig.preset("pgm-img-tiny", vocab_size=18, seq_len=65, num_classes=10, image_grid=[8, 9])


def test_arccos_partition_keeps_bos_in_group_0_and_follows_the_schedule():
    objective = ImageObjective(num_classes=CLASSES)
    r = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]).repeat_interleave(400)
    groups = objective.groups(r, L, torch.Generator().manual_seed(0))
    assert not groups[:, 0].any()
    p = torch.tensor([1.0, math.acos(0.2) / (math.pi / 2), 2 / 3, math.acos(0.9) / (math.pi / 2), 0.0])
    torch.testing.assert_close(arccos_group1_probability(torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])), p)
    share = groups[:, 1:].float().view(5, 400, L - 1).mean(dim=(1, 2))
    n = 400 * (L - 1)
    for observed, expected in zip(share.tolist(), p.tolist()):
        assert abs(observed - expected) <= 5 * math.sqrt(expected * (1 - expected) / n) + 1e-9


def test_loss_is_the_unweighted_mean_cross_entropy_over_every_code(model):
    objective = ImageObjective(num_classes=CLASSES, label_dropout=0.0)
    tokens, labels, r = _tokens(4, seed=7), torch.tensor([0, 1, 2, 3]), torch.tensor([0.1, 0.4, 0.7, 0.95])
    loss = objective.loss(model, tokens, r, torch.Generator().manual_seed(9), labels=labels)
    groups = objective.groups(r, L, torch.Generator().manual_seed(9))
    logits = model(tokens, groups, labels=labels)
    expected = F.cross_entropy(logits[:, 1:].flatten(0, 1), tokens[:, 1:].flatten())  # BOS excluded
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    total, count = objective.nelbo(model, tokens, r, torch.Generator().manual_seed(9), labels=labels)
    assert count == 4 * (L - 1)
    torch.testing.assert_close(total / count, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        objective.loss(model, tokens, r)


def test_label_dropout_replaces_ten_percent_by_the_null_label():
    objective = ImageObjective(num_classes=CLASSES)
    labels = torch.arange(20_000) % CLASSES
    dropped = objective.drop_labels(labels, torch.Generator().manual_seed(0))
    null = dropped == CLASSES
    assert abs(null.float().mean().item() - 0.1) < 5 * math.sqrt(0.09 / 20_000)
    assert torch.equal(dropped[~null], labels[~null])


def test_training_loss_uses_the_dropped_labels(model):
    """label_dropout 1: every label is the null one in the loss, never in validation."""
    objective = ImageObjective(num_classes=CLASSES, label_dropout=1.0)
    tokens, labels, r = _tokens(2, seed=8), torch.tensor([1, 6]), torch.tensor([0.3, 0.6])
    loss = objective.loss(model, tokens, r, torch.Generator().manual_seed(4), labels=labels)
    groups = objective.groups(r, L, torch.Generator().manual_seed(4))
    null = model(tokens, groups, labels=torch.full_like(labels, CLASSES), targets=tokens)[:, 1:].mean()
    true = model(tokens, groups, labels=labels, targets=tokens)[:, 1:].mean()
    torch.testing.assert_close(loss, null)
    total, count = objective.nelbo(model, tokens, r, torch.Generator().manual_seed(4), labels=labels)
    torch.testing.assert_close(total / count, true)
    assert (null - true).abs() > 1e-4
