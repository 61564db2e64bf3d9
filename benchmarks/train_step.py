"""Tokens/s, achieved FLOP/s and peak memory of one training step (forward, backward,
AdamW), per preset, attention backend, loss chunk, activation checkpointing and
``torch.compile``, beside this machine's dense matmul rate measured in the same run.
FLOPs are model FLOPs counting only the attention pairs the partition allows
(``pgm_dist.flops``), the numerator of MFU (printed for GPUs of known bf16 peak).

Each configuration runs in a fresh process, so its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated``, on a CPU the peak RSS above the RSS before the
model was built (weights, AdamW state, activations, allocator slack).

CPU defaults use a reduced batch; on a GPU: ``--device cuda --batch 8 --seq-len 1024``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import resource
import time

import torch

from pgm_dist import ModelConfig, build_model
from pgm_dist.attention import available_backends
from pgm_dist.flops import peak_flops, training_flops_per_token
from pgm_dist.objectives import objective_for

ON_OFF = {"off": False, "on": True}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["pgm-tiny", "pgm-small"])
    p.add_argument("--backends", nargs="+", default=sorted(available_backends(), key=lambda b: b != "reference"),
                   help="attention backends; the first is the baseline of the speed-up column")
    p.add_argument("--loss-chunks", nargs="+", type=int, default=[0, ModelConfig.loss_chunk],
                   help="tokens per chunk of the output projection + cross-entropy (0: unchunked)")
    p.add_argument("--checkpointing", nargs="+", choices=ON_OFF, default=["off", "on"],
                   help="activation checkpointing per block")
    p.add_argument("--compile", nargs="+", choices=ON_OFF, default=["off"], help="torch.compile of the model")
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_rate(preset: str, backend: str, loss_chunk: int, checkpointing: bool, compile: bool,
              args) -> tuple[float, float, float]:
    """Run in a fresh process: (tokens/s, model FLOP/s, peak memory in bytes)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rss_before = _rss_bytes()
    config = ModelConfig.preset(preset, vocab_size=args.vocab_size, seq_len=args.seq_len, attention=backend,
                                loss_chunk=loss_chunk, activation_checkpointing=checkpointing)
    model = build_model(config).to(device)
    if compile:
        model.compile()
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    tokens_per_s = args.steps * args.batch * args.seq_len / (time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss: KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return tokens_per_s, tokens_per_s * training_flops_per_token(model, config), peak


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rate = matmul_rate(device, dtype)
    gpu_peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    print(f"device {device}, {args.dtype}, batch {args.batch} x L {args.seq_len}, V {args.vocab_size}; "
          f"dense matmul rate measured here: {rate / 1e12:.3f} TFLOP/s"
          + (f"; MFU against a bf16 peak of {gpu_peak / 1e12:.0f} TFLOP/s" if gpu_peak else ""))
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS+ MiB"
    print(f"{'preset':<12} {'backend':<10} {'chunk':>6} {'ckpt':>4} {'comp':>4} {'tokens/s':>10} {'TFLOP/s':>8} "
          f"{'of matmul':>9} {'MFU':>6} {memory:>14} {'vs first':>8}")
    # A fresh process per configuration: its peak memory and compile caches are its own.
    spawn = multiprocessing.get_context("spawn")
    for preset in args.presets:
        baseline = None
        for backend, chunk, ckpt, comp in itertools.product(args.backends, args.loss_chunks, args.checkpointing,
                                                            args.compile):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                tokens_per_s, flops, peak = pool.submit(step_rate, preset, backend, chunk, ON_OFF[ckpt],
                                                        ON_OFF[comp], args).result()
            baseline = baseline or tokens_per_s
            mfu = f"{flops / gpu_peak:.1%}" if gpu_peak else "-"
            print(f"{preset:<12} {backend:<10} {chunk:>6} {ckpt:>4} {comp:>4} {tokens_per_s:>10,.0f} "
                  f"{flops / 1e12:>8.3f} {flops / rate:>9.1%} {mfu:>6} {peak / 2**20:>14,.0f} "
                  f"{tokens_per_s / baseline:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
