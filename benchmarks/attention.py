"""Partition attention, forward + backward, per backend: ``reference`` (dense boolean mask
+ SDPA, as the paper's code), ``flex`` (FlexAttention block mask) and ``triton`` (the
fused kernels that skip the tiles the partition forbids). Groups are drawn as in
training (``t ~ U(0, 1)``, group 1 with probability ``t``). Prints milliseconds per
call and each backend's speed-up over ``reference``, per mode.

GPU: ``python benchmarks/attention.py`` (L 1024/2048/4096, batch 8, d 768/12 and 1024/16
heads, bf16). On a CPU the defaults shrink and only ``reference`` and ``flex`` run.
"""
from __future__ import annotations

import argparse
import time

import torch

from pgm_dist.attention import AttentionMask, attend


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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_backend(backend, q, k, v, mask, grad_out, repeats, device) -> float:
    def call():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, mask, backend).backward(grad_out)

    call()  # warm-up (and compilation)
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
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
                times = {b: time_backend(b, q, k, v, AttentionMask(mode, groups=groups), grad_out, args.repeats,
                                         device) for b in args.backends}
                base = times[args.backends[0]]
                rows.append(dict(shape=shape, L=L, mode=mode, **times))
                print(f"{shape:<8} {L:>5} {mode:<12} "
                      + " ".join(f"{times[b]:>13.2f} {base / times[b]:>5.2f}x" for b in args.backends))
    return rows


if __name__ == "__main__":
    main()
