"""Backends agree with each other and with a plain softmax written out here."""
import math

import pytest
import torch

from pgm_dist.attention.flex import dense_attention_backward
from pgm_dist.attention.interface import AttentionMask, attend, available_backends, resolve_backend
from tests.helpers.models import randomized_model

B, H, L, D = 4, 2, 150, 64  # L is not a multiple of FlexAttention's 128-wide tiles

needs_flex = pytest.mark.skipif("flex" not in available_backends(), reason="torch without FlexAttention")


def _groups() -> torch.Tensor:
    g = torch.rand(B, L, generator=torch.Generator().manual_seed(0)) < 0.4
    g[1] = False  # group 1 empty
    g[2] = True  # group 0 empty
    return g


def _masks():
    groups = _groups()
    return {
        "same_group": AttentionMask.same_group(groups),
        "cross_group": AttentionMask.cross_group(groups),
        "full": AttentionMask.full(),
        "full_lengths": AttentionMask.full(torch.tensor([L, 1, 0, 77])),
    }


def _naive_attention(q, k, v, allowed):
    """Softmax attention written out in float64; rows without keys give zero."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return (weights @ v.double()).float()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3)]


def _run(backend, mask_name, seed=0):
    q, k, v = _inputs(seed)
    out = attend(q, k, v, _masks()[mask_name], backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def test_mask_semantics():
    groups = _groups()
    m = _masks()
    same = m["same_group"].allowed(L, L, "cpu")[:, 0]
    cross = m["cross_group"].allowed(L, L, "cpu")[:, 0]
    i, j = 5, 9
    for b in range(B):
        assert same[b, i, j] == (groups[b, i] == groups[b, j])
    assert (same ^ cross).all()
    lengths = m["full_lengths"].allowed(L, L, "cpu")[:, 0]
    assert lengths.sum(-1)[:, 0].tolist() == [L, 1, 0, 77]


@pytest.mark.parametrize("mode", ["same_group", "cross_group", "full", "full_lengths"])
def test_reference_matches_written_out_softmax(mode):
    q, k, v = _inputs()
    mask = _masks()[mode]
    out = attend(q, k, v, mask, "reference")
    expected = _naive_attention(q, k, v, mask.allowed(L, L, "cpu"))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["cross_group", "full_lengths"])  # same_group always sees itself
def test_rows_without_keys_give_zero_output_and_zero_gradients(mode):
    mask = _masks()[mode]
    out, dq, dk, dv = _run("reference", mode)
    no_key = ~mask.allowed(L, L, "cpu").any(-1)[:, 0]  # [B, L]
    assert no_key.any()
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert out.permute(0, 2, 1, 3)[no_key].abs().max() == 0
    assert dq.permute(0, 2, 1, 3)[no_key].abs().max() == 0


@pytest.mark.parametrize("mode", ["same_group", "cross_group", "full_lengths"])
def test_dense_backward_equations_match_autograd(mode):
    q, k, v = _inputs()
    allowed = _masks()[mode].allowed(L, L, "cpu")
    ref_out, *ref_grads = _run("reference", mode)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1))
    grads = dense_attention_backward(q.detach(), k.detach(), v.detach(), ref_out, grad_out, allowed)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_flex
@pytest.mark.parametrize("mode", ["same_group", "cross_group", "full", "full_lengths"])
def test_flex_matches_reference_outputs_and_gradients(mode):
    for got, want in zip(_run("flex", mode), _run("reference", mode)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@needs_flex
def test_flex_model_matches_reference_model():
    models = {name: randomized_model("pgm-tiny", seq_len=L, attention=name) for name in ("reference", "flex")}
    tokens = torch.randint(0, 61, (B, L), generator=torch.Generator().manual_seed(5))
    groups = _groups()
    logits, grads = {}, {}
    for name, model in models.items():
        logits[name] = model(tokens, groups)
        logits[name].square().mean().backward()
        grads[name] = model.encoder[0].attn.q_proj.weight.grad
    torch.testing.assert_close(logits["flex"], logits["reference"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads["flex"], grads["reference"], atol=1e-5, rtol=1e-3)


def test_backend_resolution():
    assert resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(ValueError, match="reference"):
        resolve_backend("magic", "cpu")
    with pytest.raises(ValueError, match="same_group"):
        AttentionMask("diagonal")
