"""Partition attention, forward + backward, per backend: ``reference`` (dense boolean mask
+ SDPA, as the paper's code), ``flex`` (FlexAttention block mask) and ``triton`` (the
fused kernels that skip the tiles the partition forbids). Groups are drawn as in
training (``t ~ U(0, 1)``, group 1 with probability ``t``). Prints milliseconds per
call and each backend's speed-up over ``reference``, per mode.

GPU: ``python benchmarks/attention.py`` (L 1024/2048/4096, batch 8, d 768/12 and 1024/16
heads, bf16). On a CPU the defaults shrink and only ``reference`` and ``flex`` run.

``--target RATIO`` adds a line saying whether ``triton`` is at least RATIO times faster than
``reference`` at ``--target-length`` in every shape and mode (the issue's goal: 2.5 at L 1024).

``--check TOL`` times nothing: it prints each backend's max abs error in the output and
the three gradients, run in ``--dtype``, against ``reference`` in fp32 on the same
(rounded) inputs, and exits with status 1 when an error exceeds ``TOL`` times the largest
magnitude of that tensor. ``reference`` in ``--dtype`` is the baseline (SDPA's own error).
"""
from __future__ import annotations

import argparse

import torch
from timing import timed  # benchmarks/timing.py (this script's folder is on sys.path)

from pgm_dist.attention.interface import AttentionMask, attend


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096] if cuda else [256, 512])
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--shapes", nargs="+", default=["768/12", "1024/16"] if cuda else ["768/12"],
                   help="model width / heads")
    p.add_argument("--backends", nargs="+", default=["reference", "flex", "triton"] if cuda else ["reference", "flex"])
    p.add_argument("--modes", nargs="+", default=["same_group", "cross_group"])
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", type=float, metavar="TOL", help="compare with fp32 reference instead of timing")
    p.add_argument("--target", type=float, metavar="RATIO",
                   help="print whether triton is RATIO x faster than reference at --target-length")
    p.add_argument("--target-length", type=int, default=1024)
    args = p.parse_args(argv)
    if args.target is not None:
        if args.check is not None or not {"reference", "triton"} <= set(args.backends):
            p.error("--target times triton against reference: give both in --backends, without --check")
        if args.target_length not in args.lengths:
            p.error(f"--target-length {args.target_length} is not one of --lengths {args.lengths}")
    return args


def time_backend(backend, q, k, v, mask, grad_out, repeats, device) -> float:
    def call():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, mask, backend).backward(grad_out)

    call()  # warm-up (and compilation)
    call()
    return timed(call, device, repeats) * 1e3


def forward_backward(backend, q, k, v, mask, grad_out, dtype) -> list[torch.Tensor]:
    """Output, dq, dk, dv of one call on copies of the inputs cast to ``dtype``, as fp32."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, mask, backend)
    out.backward(grad_out.to(dtype))
    return [t.float() for t in [out.detach()] + [t.grad for t in leaves]]


def check_errors(backends, q, k, v, mask, grad_out) -> dict[str, list[float]]:
    """Max abs error of out, dq, dk, dv per backend (run in q's dtype) against fp32 ``reference``,
    and under ``"scale"`` the largest magnitude of each fp32 tensor."""
    want = forward_backward("reference", q, k, v, mask, grad_out, torch.float32)
    errors = {"scale": [w.abs().max().item() for w in want]}
    for backend in backends:
        got = forward_backward(backend, q, k, v, mask, grad_out, q.dtype)
        errors[backend] = [(g - w).abs().max().item() for g, w in zip(got, want)]
    return errors


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    if args.check is not None:
        print(f"device {device}, {args.dtype} against fp32 reference, batch {args.batch}; max abs error of "
              f"out / dq / dk / dv; fails over {args.check} x the largest magnitude")
    else:
        print(f"device {device}, {args.dtype}, batch {args.batch}; forward + backward, ms per call")
        print(f"{'shape':<8} {'L':>5} {'mode':<12} " + " ".join(f"{b + ' ms':>13} {'x':>6}" for b in args.backends))
    for shape in args.shapes:
        width, heads = map(int, shape.split("/"))
        for L in args.lengths:
            t = torch.rand(args.batch, 1, generator=gen)
            groups = (torch.rand(args.batch, L, generator=gen) < t).to(device)
            q, k, v = (torch.randn(args.batch, heads, L, width // heads, generator=gen).to(device, dtype)
                       .requires_grad_() for _ in range(3))
            grad_out = torch.randn_like(q)
            for mode in args.modes:
                mask = AttentionMask(mode, groups=groups)
                if args.check is not None:
                    errors = check_errors(args.backends, q, k, v, mask, grad_out)
                    print(f"{shape:<8} {L:>5} {mode:<12} {'max |fp32|':<10} "
                          + " / ".join(f"{m:.2e}" for m in errors["scale"]))
                    for backend in args.backends:
                        failed = any(e > args.check * m for e, m in zip(errors[backend], errors["scale"]))
                        rows.append(dict(shape=shape, L=L, mode=mode, backend=backend, errors=errors[backend],
                                         failed=failed))
                        print(f"{shape:<8} {L:>5} {mode:<12} {backend:<10} "
                              + " / ".join(f"{e:.2e}" for e in errors[backend]) + ("   FAIL" if failed else "   ok"))
                else:
                    times = {b: time_backend(b, q, k, v, mask, grad_out, args.repeats, device) for b in args.backends}
                    base = times[args.backends[0]]
                    rows.append(dict(shape=shape, L=L, mode=mode, **times))
                    print(f"{shape:<8} {L:>5} {mode:<12} "
                          + " ".join(f"{times[b]:>13.2f} {base / times[b]:>5.2f}x" for b in args.backends))
    if args.target is not None:
        print(target_verdict(rows, args.target, args.target_length))
    return rows


def target_verdict(rows: list[dict], target: float, length: int) -> str:
    """One line: whether triton's speed-up over reference (ms ratio) reaches ``target`` in every
    timed row of length ``length``, with each row's speed-up."""
    ratios = {f"{r['shape']} {r['mode']}": r["reference"] / r["triton"] for r in rows if r["L"] == length}
    verdict = "MET" if all(x >= target for x in ratios.values()) else "NOT MET"
    return (f"ATTENTION TARGET (triton >= {target}x reference at L {length}): {verdict}; "
            + ", ".join(f"{k} {x:.2f}x" for k, x in ratios.items()))


if __name__ == "__main__":
    rows = main()
    failures = sum(row.get("failed", False) for row in rows)
    if failures:
        raise SystemExit(f"FAILED: {failures} backend/shape/length/mode combination(s) over the tolerance")
