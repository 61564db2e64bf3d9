"""The fused Triton partition-attention kernels against the reference backend.

On a CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest),
with small shapes so the suite stays fast; on a GPU, compiled.
"""
from __future__ import annotations

import pytest
import torch

from pgm_dist.attention.interface import AttentionMask, attend, available_backends
from pgm_dist.attention.triton_backend import BLOCK, group_sorted_layout
from tests.helpers.models import randomized_model

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


def _compare(mode, groups, D, H=2, seed=0, atol=2e-5, rtol=1e-4, dtype=torch.float32):
    """Triton in ``dtype`` against the reference in fp32 on the same (rounded) inputs."""
    B, L = groups.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(B, H, L, D, generator=gen).to(dtype) for _ in range(4))
    results = {}
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        leaves = [t.detach().to(DEVICE, run_dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, AttentionMask(mode, groups=groups.to(DEVICE)), backend)
        out.backward(grad_out.to(DEVICE, run_dtype))
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert got.dtype == dtype, f"{mode} {name} is {got.dtype}"
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol, msg=f"{mode} {name}")
    return results["triton"]


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
@pytest.mark.parametrize("case", ["mixed", "all_group0", "all_group1"])
def test_kernels_match_reference_with_empty_groups(mode, case):
    _compare(mode, _groups(4, 45, case), D=64)  # 45: not a multiple of the tile


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
@pytest.mark.parametrize("head_dim,length", [(16, 50), (32, 70), (128, 33), (64, 64)])
def test_kernels_match_reference_for_head_dims_and_lengths(mode, head_dim, length):
    _compare(mode, _groups(3, length, "mixed", seed=head_dim), D=head_dim)


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
@pytest.mark.parametrize("head_dim,length", [(16, 45), (64, 40)])
def test_fp16_kernels_match_the_fp32_reference(mode, head_dim, length):
    """fp16 in, fp16 out, fp32 accumulation: errors up to ~0.4 of this tolerance, as SDPA's own fp16;
    a logsumexp kept in fp16 exceeds it 1.5x. (bf16 is checked on a GPU only, in
    benchmarks/gpu_check.sh: the interpreter's bf16 ``tl.dot`` is wrong.)"""
    _compare(mode, _groups(3, length, "mixed", seed=head_dim), D=head_dim, atol=1e-3, rtol=1e-3,
             dtype=torch.float16)


@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
def test_rows_without_keys_give_zero_output_and_gradients(mode):
    groups = _groups(3, 40, "mixed")
    out, dq, _, _ = _compare(mode, groups, D=32)
    if mode == "cross_group":  # the all-group-0 and all-group-1 sequences see nothing
        assert out[1:].abs().max() == 0 and dq[1:].abs().max() == 0


def _pure_tile_rows(perm: torch.Tensor, n0: int, group: int, block: int) -> torch.Tensor:
    """Memory rows of one sequence lying in tiles (of ``block`` sorted indices) wholly in ``group``."""
    L = perm.shape[0]
    starts = torch.arange(L) // block * block
    ends = (starts + block).clamp(max=L)
    pure = ends <= n0 if group == 0 else starts >= n0
    return perm[pure].long()


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("mode", ["same_group", "cross_group"])
def test_forbidden_tiles_are_never_loaded_forward_or_backward(mode):
    """NaN in every row that a tile of one group may not see: a kernel that loaded such a row,
    even to mask it, would give NaN (0 * NaN = NaN in P @ V, P^T @ dO and dS @ K).

    Sequence 0 checks the pure group-0 tiles, sequence 1 the pure group-1 tiles; both splits
    lie inside a tile, so the rows a straddling tile skips are poisoned too. Keys and values
    are poisoned for the forward and dQ kernels; queries and output gradients (one run apart:
    in cross-group attention they are the very rows checked) for the dK/dV kernel.
    """
    block_m, block_n = BLOCK["cuda" if DEVICE == "cuda" else "cpu"]
    assert block_m == block_n  # a query tile and a key tile cover the same sorted indices
    B, H, L, D = 2, 2, 2 * block_m + block_m // 2, 16
    n0s, checked = (block_m + block_m // 2 - 1, block_m // 2 + 1), (0, 1)  # n0 of sequence b; its group
    gen = torch.Generator().manual_seed(0)
    groups = torch.stack([torch.randperm(L, generator=gen) >= n0 for n0 in n0s])
    perm, n0 = group_sorted_layout(groups)
    assert n0.tolist() == list(n0s)
    q, k, v, grad_out = (torch.randn(B, H, L, D, generator=gen) for _ in range(4))
    mask = AttentionMask(mode, groups=groups.to(DEVICE))

    def run(backend, tensors):
        leaves = [t.detach().to(DEVICE).requires_grad_() for t in tensors[:3]]
        out = attend(*leaves, mask, backend)
        out.backward(tensors[3].to(DEVICE))
        return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]

    want = run("reference", (q, k, v, grad_out))
    for poisoned, outputs in (((1, 2), (0, 1)), ((0, 3), (2, 3))):  # (k, v) -> out, dq; (q, dO) -> dk, dv
        tensors = [t.clone() for t in (q, k, v, grad_out)]
        for b, g in enumerate(checked):
            forbidden = groups[b] != bool(g) if mode == "same_group" else groups[b] == bool(g)
            for i in poisoned:
                tensors[i][b, :, forbidden] = float("nan")
        got = run("triton", tensors)
        for b, g in enumerate(checked):
            rows = _pure_tile_rows(perm[b], n0s[b], g, block_m)
            assert len(rows) >= block_m
            for i in outputs:
                name = ("out", "dq", "dk", "dv")[i]
                torch.testing.assert_close(got[i][b, :, rows], want[i][b, :, rows], atol=2e-5, rtol=1e-4,
                                           msg=f"{mode} {name} of the pure group-{g} tiles")


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
