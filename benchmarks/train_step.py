"""Tokens/s and achieved FLOP/s of one training step (forward, backward, AdamW), per
preset and attention backend, beside this machine's dense matmul rate measured in the
same run. FLOPs are model FLOPs counting only the attention pairs the partition
allows (``pgm_dist.flops``), the numerator of MFU.

CPU defaults use a reduced batch; on a GPU: ``--device cuda --batch 8 --seq-len 1024``.
"""
from __future__ import annotations

import argparse
import time

import torch

from pgm_dist import ModelConfig, build_model
from pgm_dist.attention import available_backends
from pgm_dist.flops import training_flops_per_token
from pgm_dist.objectives import objective_for


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["pgm-tiny", "pgm-small"])
    p.add_argument("--backends", nargs="+", default=sorted(available_backends(), key=lambda b: b != "reference"),
                   help="attention backends; the first is the baseline")
    p.add_argument("--vocab-size", type=int, default=50258)
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--seq-len", type=int, default=1024 if cuda else 256)
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16" if cuda else "float32")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n=2048 if torch.cuda.is_available() else 1024, reps=5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_rate(preset, backend, args, device, dtype) -> tuple[float, float]:
    config = ModelConfig.preset(preset, vocab_size=args.vocab_size, seq_len=args.seq_len, attention=backend)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = objective_for(config)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def step():
        t = torch.rand(args.batch, device=device, generator=generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = objective.loss(model, tokens, t, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    tokens_per_s = args.steps * args.batch * args.seq_len / (time.perf_counter() - start)
    return tokens_per_s, tokens_per_s * training_flops_per_token(model, config)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = matmul_rate(device, dtype)
    print(f"device {device}, {args.dtype}, batch {args.batch} x L {args.seq_len}; "
          f"dense matmul rate measured here: {peak / 1e12:.3f} TFLOP/s")
    print(f"{'preset':<14} {'backend':<10} {'tokens/s':>12} {'TFLOP/s':>9} {'of matmul':>10} {'vs reference':>13}")
    for preset in args.presets:
        baseline = None
        for backend in args.backends:
            tokens_per_s, flops = step_rate(preset, backend, args, device, dtype)
            baseline = baseline or tokens_per_s
            print(f"{preset:<14} {backend:<10} {tokens_per_s:>12,.0f} {flops / 1e12:>9.3f} {flops / peak:>9.1%} "
                  f"{tokens_per_s / baseline:>12.2f}x")


if __name__ == "__main__":
    main()
