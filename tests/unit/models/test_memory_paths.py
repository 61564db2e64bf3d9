"""The memory-saving paths compute what the plain ones do: the chunked loss (logits never
whole in float32), MDLM logits without a MASK column, activation checkpointing, and
``torch.compile``. In process, tiny models, fp32."""
import pytest
import torch
import torch.nn.functional as F

from pgm_dist.attention.interface import AttentionMask
from pgm_dist.evaluation.nelbo import nelbo_sums
from pgm_dist.models.layers import positions_like
from pgm_dist.objectives import partition_groups
from pgm_dist.sampling import sample_mdlm
from pgm_dist.training.components import objective_for
from tests.helpers.models import randomized_model

V, L, B = 61, 48, 2  # B L = 96 tokens


def _tokens(seed: int = 0, batch: int = B) -> torch.Tensor:
    return torch.randint(0, V, (batch, L), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, seed: int = 3):
    """One training loss (dropout on, seeded) and every parameter's gradient."""
    model.train()
    torch.manual_seed(seed)
    loss = objective_for(model.config).loss(model, _tokens(), torch.tensor([0.3, 0.8]),
                                            torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same(a, b, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=atol, msg=name)


def _network_input(model, tokens):
    """(args, kwargs) of the network call the objectives make, with a fixed partition / masking."""
    masked = partition_groups(torch.tensor([0.4, 0.7]), L, objective_for(model.config).schedule,
                              torch.Generator().manual_seed(1))
    if model.config.arch == "pgm":
        return (tokens, masked)
    return (tokens.masked_fill(masked, model.config.mask_id),)


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
@pytest.mark.parametrize("chunk", [7, 32])  # 96 tokens: 7 leaves a short last chunk, 32 divides
def test_chunked_nll_loss_and_gradients_equal_the_dense_path(preset, chunk):
    dense, chunked = randomized_model(preset, loss_chunk=0), randomized_model(preset, loss_chunk=chunk)
    tokens = _tokens()
    # The per-token NLL, against cross-entropy on the whole logits of the plain forward.
    with torch.no_grad():
        logits = dense(*_network_input(dense, tokens))  # [B, L, V]
        want = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        for model in (dense, chunked):
            torch.testing.assert_close(model(*_network_input(model, tokens), targets=tokens), want,
                                       rtol=0, atol=1e-5)
    _assert_same(_loss_and_grads(chunked), _loss_and_grads(dense), atol=1e-5)


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_validation_nelbo_is_unchanged_by_chunking(preset):
    batches = [_tokens(seed) for seed in range(3)]
    models = [randomized_model(preset, loss_chunk=chunk) for chunk in (0, 7)]
    sums = [nelbo_sums(model, objective_for(model.config), batches, torch.device("cpu"), seed=5) for model in models]
    assert sums[0][1] == 3 * B * L and sums[0][0] > 0
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-6, atol=0)


def _saved_activation_bytes(model) -> int:
    """Bytes autograd keeps for backward over one training loss, parameters left out (they
    are kept anyway); what a checkpointed region recomputes is not kept."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(x):
        if x.data_ptr() not in params:
            saved[x.data_ptr()] = max(saved.get(x.data_ptr(), 0), x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        objective_for(model.config).loss(model.train(), _tokens(batch=8), torch.rand(8),
                                         torch.Generator().manual_seed(0))
    return sum(saved.values())


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_chunked_loss_and_checkpointing_keep_less_for_backward(preset):
    """Dense, backward keeps the float32 log-softmax of the logits: 4 bytes x B L V. Chunked,
    no [B L, V] tensor at all: recomputed chunks keep their inputs; the fused op keeps the input's
    gradient ([B L, d], as large as the input) and the output weight's and bias's float32 gradients
    ([V, d + 1]); checkpointed, each block keeps only its input."""
    vocab = 4000
    kept = {(chunk, fused, ckpt): _saved_activation_bytes(randomized_model(
        preset, vocab_size=vocab, loss_chunk=chunk, fused_loss=fused, activation_checkpointing=ckpt))
        for chunk, fused, ckpt in [(0, True, False), (64, False, False), (64, True, False), (64, True, True)]}
    logits_bytes = 8 * L * vocab * 4
    d = randomized_model(preset).config.d_model
    assert kept[0, True, False] - kept[64, False, False] > 0.95 * logits_bytes  # a few small chunk tensors kept
    assert 0 < kept[64, True, False] - kept[64, False, False] <= vocab * (d + 1) * 4
    assert kept[64, True, True] < kept[64, True, False] / 2


def test_mdlm_logits_are_the_old_logits_without_the_mask_column():
    """The MDLM network used to append a -inf MASK column to its logits; now it returns the
    first V columns of those logits, and the sampler never draws MASK."""
    model = randomized_model("mdlm-tiny")
    noisy = _network_input(model, _tokens())[0]
    with torch.no_grad():
        new = model(noisy)
        # the pre-change forward, composed from the network's modules
        c, rope = model.cond(), model.rotary(positions_like(noisy))
        x = model.embed(noisy)
        for block in model.blocks:
            x = block(x, c, rope, AttentionMask.full())
        logits = model.output(x, c)
        old = torch.cat([logits, torch.full_like(logits[..., :1], float("-inf"))], dim=-1)
    assert new.shape == (B, L, V) and old.shape == (B, L, V + 1)
    torch.testing.assert_close(new, old[..., :V], rtol=0, atol=0)
    torch.testing.assert_close(new.log_softmax(-1), old.log_softmax(-1)[..., :V], rtol=0, atol=1e-6)
    for temperature, top_p in [(1.0, 1.0), (2.0, 0.9), (0.0, 1.0)]:
        out = sample_mdlm(model, 4, 6, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert (out != model.config.mask_id).all() and (out < V).all()


@pytest.mark.parametrize("preset,backend", [("pgm-tiny", "reference"), ("mdlm-tiny", "reference"),
                                            ("pgm-tiny", "triton")])
def test_activation_checkpointing_keeps_loss_and_gradients(preset, backend):
    """Dropout 0.1 is on: the recomputation must draw the same masks as the forward did."""
    plain, checkpointed = (randomized_model(preset, attention=backend, activation_checkpointing=ckpt)
                           for ckpt in (False, True))
    assert plain.config.dropout > 0
    _assert_same(_loss_and_grads(checkpointed), _loss_and_grads(plain), atol=1e-6)
