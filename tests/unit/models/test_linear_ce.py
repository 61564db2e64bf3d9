"""The fused output projection + weighted cross-entropy (pgm_dist/models/linear_ce.py): its loss and
gradients equal autograd's through the dense logits, for the op and through whole PGM, MDLM and
image models (fp32, 1e-6), with activation checkpointing and accumulated micro-batches; it saves
no tensor of B x L x V elements for backward."""
import pytest
import torch
import torch.nn.functional as F

from pgm_dist.images.objective import ImageObjective
from pgm_dist.models.linear_ce import weighted_linear_cross_entropy
from pgm_dist.training.components import objective_for
from tests.helpers.models import randomized_model

V, L, B = 61, 48, 2  # B L = 96 tokens


def _inputs(bias: bool, dtype=torch.float32, n: int = 96, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, d, generator=g, dtype=dtype)).requires_grad_()
    b = (0.3 * torch.randn(V, generator=g, dtype=dtype)).requires_grad_() if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.7)  # some tokens weigh 0
    return h, weight, b, targets, weights


def assert_equal_in_fp32(got, want, msg=None):
    """Equal to 1e-6 of the tensor's scale: sums over tokens taken in another order (per chunk)
    differ by a few float32 roundings, nothing more."""
    scale = max(1.0, want.abs().max().item())
    error = (got - want).abs().max().item()
    assert error <= 1e-6 * scale, f"{msg or ''}: max difference {error:.3g} at scale {scale:.3g}"


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [7, 32, 96, 500])  # a short last chunk, dividing, one chunk, larger than N
@pytest.mark.parametrize("bias", [True, False])
def test_the_op_equals_autograd_through_the_dense_logits(chunk, bias):
    h, weight, b, targets, weights = _inputs(bias)
    total, nll = weighted_linear_cross_entropy(h, weight, b, targets, weights, chunk)
    logits = h @ weight.t() + (b if bias else 0)
    want_nll = F.cross_entropy(logits, targets, reduction="none")
    want = (weights * want_nll).sum()
    assert_equal_in_fp32(total, want)
    assert_equal_in_fp32(nll, want_nll.detach())
    assert not nll.requires_grad
    # an upstream scale (the objective's normaliser, the loss scaler) multiplies every gradient
    for got, expected in zip(_grads(3.5 * total, (h, weight, b)), _grads(3.5 * want, (h, weight, b))):
        assert_equal_in_fp32(got, expected)


def test_without_gradients_nothing_is_made_or_kept():
    h, weight, b, targets, weights = _inputs(True)
    with torch.no_grad():
        total, _ = weighted_linear_cross_entropy(h, weight, b, targets, weights, 7)
    assert total.grad_fn is None
    assert_equal_in_fp32(total, (weights * F.cross_entropy(h @ weight.t() + b, targets, reduction="none")).sum())
    with pytest.raises(ValueError, match="must not require gradients"):
        weighted_linear_cross_entropy(h, weight, b, targets, weights.requires_grad_(), 7)


def test_bf16_is_close_to_the_fp32_dense_path():
    h, weight, b, targets, weights = _inputs(True, dtype=torch.bfloat16)
    total, _ = weighted_linear_cross_entropy(h, weight, b, targets, weights, 32)
    grads = _grads(total, (h, weight, b))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, weight, b))
    want = (weights * F.cross_entropy(h32 @ w32.t() + b32, targets, reduction="none")).sum()
    torch.testing.assert_close(total, want, rtol=2e-2, atol=0)
    for got, expected in zip(grads, _grads(want, (h32, w32, b32))):
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=3e-2 * expected.abs().max().item())


def _tokens(seed: int = 0, batch: int = B, vocab: int = V, length: int = L) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model_loss_and_grads(model, tokens, **labels):
    model.train()
    torch.manual_seed(3)
    objective = objective_for(model.config) if not labels else ImageObjective(num_classes=10)
    t = torch.linspace(0.2, 0.9, tokens.shape[0])
    loss = objective.loss(model, tokens, t, torch.Generator().manual_seed(3), **labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


CASES = {  # preset, model overrides, tokens, labels
    "pgm": ("pgm-tiny", {}, lambda: _tokens(), {}),
    "mdlm": ("mdlm-tiny", {}, lambda: _tokens(), {}),
    "image": ("pgm-img-tiny", dict(vocab_size=18, seq_len=65, num_classes=10, image_grid=[8, 8]),
              lambda: torch.cat([torch.full((2, 1), 17), _tokens(batch=2, vocab=17, length=64)], dim=1),
              {"labels": torch.tensor([3, 7])}),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [7, 32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fused_loss_and_every_gradient_equal_the_dense_paths(case, chunk, checkpointing):
    preset, overrides, tokens, labels = CASES[case]
    tokens = tokens()
    runs = {}
    for name, options in {"dense": dict(loss_chunk=0), "fused": dict(loss_chunk=chunk, fused_loss=True),
                          "recomputed": dict(loss_chunk=chunk, fused_loss=False)}.items():
        model = randomized_model(preset, **overrides, **options, activation_checkpointing=checkpointing)
        runs[name] = _model_loss_and_grads(model, tokens, **labels)
    (dense_loss, dense_grads) = runs["dense"]
    for name in ("fused", "recomputed"):
        loss, grads = runs[name]
        assert_equal_in_fp32(loss, dense_loss, name)
        assert grads.keys() == dense_grads.keys()
        for param in grads:
            assert_equal_in_fp32(grads[param], dense_grads[param], f"{name} {param}")


def test_two_accumulated_micro_batches_equal_one_double_batch():
    model = randomized_model("pgm-tiny", loss_chunk=32)
    tokens = _tokens(batch=4)
    groups = torch.rand(4, L, generator=torch.Generator().manual_seed(1)) < 0.5
    weights = torch.rand(4, L, generator=torch.Generator().manual_seed(2))
    model(tokens, groups, targets=tokens, weights=weights).backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        model(tokens[half], groups[half], targets=tokens[half], weights=weights[half]).backward()
    for name, p in model.named_parameters():
        assert_equal_in_fp32(p.grad, whole[name], name)


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_no_tensor_of_b_l_v_elements_is_saved_for_backward(preset):
    vocab = 4000
    model = randomized_model(preset, vocab_size=vocab, loss_chunk=64).train()
    largest = []

    def pack(x):
        largest.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = objective_for(model.config).loss(model, _tokens(batch=8, vocab=vocab), torch.rand(8),
                                                torch.Generator().manual_seed(0))
    loss.backward()
    assert max(largest) < 8 * L * vocab  # the output weight's gradient [V, d] is the largest
    assert max(largest) == vocab * model.config.d_model
