"""The Triton backend under torch.compile: one graph break, inductor around it, whole models (slow on the CPU)."""
import pytest
import torch

from pgm_dist.attention.interface import AttentionMask, attend, available_backends
from tests.helpers.models import randomized_model
from tests.unit.attention.test_triton import DEVICE, _groups

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="Triton not installed")


def _around_the_kernel(q, k, v, mask, backend):
    """Attention between two elementwise ops, which torch.compile fuses on both sides of the kernel."""
    return attend(q.sin(), k, v, mask, backend).tanh()


def test_the_kernel_is_the_only_graph_break_for_torch_compile():
    q, k, v = (torch.randn(2, 2, 40, 16, device=DEVICE) for _ in range(3))
    mask = AttentionMask.cross_group(_groups(3, 40, "mixed")[:2].to(DEVICE))
    fused = torch._dynamo.explain(_around_the_kernel)(q, k, v, mask, "triton")
    assert (fused.graph_count, fused.graph_break_count) == (2, 1)
    assert "triton_attention" in str(fused.break_reasons[0].reason)
    dense = torch._dynamo.explain(_around_the_kernel)(q, k, v, mask, "reference")
    assert (dense.graph_count, dense.graph_break_count) == (1, 0)


def test_inductor_forward_and_backward_around_the_kernel_match_reference():
    """torch.compile's default backend (inductor) on both sides of the graph break."""
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3)]
    grad_out = torch.randn(2, 2, 40, 16, generator=gen).to(DEVICE)
    mask = AttentionMask.same_group(_groups(3, 40, "mixed")[:2].to(DEVICE))
    results = {}
    for backend, fn in (("triton", torch.compile(_around_the_kernel)), ("reference", _around_the_kernel)):
        leaves = [t.to(DEVICE).requires_grad_() for t in inputs]
        out = fn(*leaves, mask, backend)
        out.backward(grad_out)
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=name)


def test_torch_compile_of_the_whole_model_matches_the_reference_model():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    L = 32
    tokens = torch.randint(0, 61, (2, L), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    groups = _groups(3, L, "mixed")[:2].to(DEVICE)
    compiled = torch.compile(randomized_model("pgm-tiny", seq_len=L, attention="triton").to(DEVICE),
                             backend=counting_backend)
    want = randomized_model("pgm-tiny", seq_len=L, attention="reference").to(DEVICE)(tokens, groups)
    torch.testing.assert_close(compiled(tokens, groups), want, atol=1e-4, rtol=1e-4)
    assert len(graphs) > 1  # broken at the kernel calls, compiled around them
