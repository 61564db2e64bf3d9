"""The fused Triton partition-attention kernels against the reference backend.

On a CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest),
with small shapes so the suite stays fast; on a GPU, compiled.
"""
from __future__ import annotations

import pytest
import torch

from pgm_dist.attention import AttentionMask, attend, available_backends
from pgm_dist.attention.triton_backend import group_sorted_layout
from tests.conftest import randomized_model

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="Triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _groups(B: int, L: int, case: str, seed: int = 0) -> torch.Tensor:
    g = torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) < 0.4
    if case == "mixed":  # different split points, one sequence all group 0, one all group 1
        g[1], g[2] = False, True
    elif case == "all_group0":
        g[:] = False
    elif case == "all_group1":
        g[:] = True
    return g


def _compare(mode, groups, D, H=2, seed=0, atol=2e-5):
    B, L = groups.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, H, L, D, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, AttentionMask(mode, groups=groups.to(DEVICE)), backend)
        out.backward(grad_out)
        results[backend] = (out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=f"{mode} {name}")
    return results["triton"]


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
@pytest.mark.parametrize("case", ["mixed", "all_group0", "all_group1"])
def test_kernels_match_reference_with_empty_groups(mode, case):
    _compare(mode, _groups(4, 45, case), D=64)  # 45: not a multiple of the tile


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
@pytest.mark.parametrize("head_dim,length", [(32, 70), (128, 33), (64, 64)])
def test_kernels_match_reference_for_head_dims_and_lengths(mode, head_dim, length):
    _compare(mode, _groups(3, length, "mixed", seed=head_dim), D=head_dim)


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
def test_rows_without_keys_give_zero_output_and_gradients(mode):
    groups = _groups(3, 40, "mixed")
    out, dq, _, _ = _compare(mode, groups, D=32)
    if mode == "cross_group":  # the all-group-0 and all-group-1 sequences see nothing
        assert out[1:].abs().max() == 0 and dq[1:].abs().max() == 0


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
def test_tiles_outside_the_allowed_pairs_are_never_loaded(mode):
    """NaN keys/values where no query of a tile may look: a kernel that loaded those tiles
    (even to mask them) would return NaN, since 0 * NaN = NaN in the P @ V product."""
    B, H, L, D = 1, 1, 64, 32
    groups = torch.zeros(B, L, dtype=torch.bool)
    groups[:, 32:] = True  # split at a tile boundary: no query tile straddles the groups
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for _ in range(3))
    poisoned_k, poisoned_v = k.clone(), v.clone()
    # Same-group queries of group 0 never need group-1 keys; cross-group ones never group-0 keys.
    rows = slice(32, 64) if mode == "same_group" else slice(0, 32)
    poisoned_k[..., rows, :] = float("nan")
    poisoned_v[..., rows, :] = float("nan")
    mask = AttentionMask(mode, groups=groups.to(DEVICE))
    clean = attend(q, k, v, mask, "reference")
    got = attend(q, poisoned_k, poisoned_v, mask, "triton")
    queries = slice(0, 32)
    torch.testing.assert_close(got[..., queries, :], clean[..., queries, :], atol=2e-5, rtol=1e-4)


def test_group_sorted_layout():
    groups = torch.tensor([[True, False, True, False, False], [True, True, True, True, True]])
    perm, n0 = group_sorted_layout(groups)
    assert perm.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]] and n0.tolist() == [3, 0]
    assert perm.dtype == torch.int32


def test_whole_model_matches_reference_forward_and_backward():
    L = 40
    models = {name: randomized_model("pgm-tiny", seq_len=L, attention=name).to(DEVICE)
              for name in ("triton", "reference")}
    tokens = torch.randint(0, 61, (3, L), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    groups = _groups(3, L, "mixed").to(DEVICE)
    logits, grads = {}, {}
    for name, model in models.items():
        logits[name] = model(tokens, groups)
        logits[name].square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=1e-4, rtol=1e-4)
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][n], g, atol=1e-5, rtol=1e-3, msg=n)


def test_torch_compile_of_the_model_around_the_kernel():
    model = randomized_model("pgm-tiny", seq_len=32, attention="triton").to(DEVICE)
    tokens = torch.randint(0, 61, (2, 32)).to(DEVICE)
    groups = _groups(3, 32, "mixed")[:2].to(DEVICE)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(tokens, groups), model(tokens, groups))
