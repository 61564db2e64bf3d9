"""Tokens/s, achieved FLOP/s and peak memory of one training step (forward, backward,
AdamW), per engine, preset, attention backend, loss chunk, activation checkpointing and
``torch.compile``, beside this machine's dense matmul rate measured in the same run.
FLOPs are model FLOPs counting only the attention pairs the partition allows
(``pgm_dist.models.flops``), the numerator of MFU (printed for GPUs of known bf16 peak).

Engines: ``plain`` is a torch AdamW step under autocast; ``deepspeed`` is what training runs:
``pgm_dist.training.engine.Engine`` (DeepSpeed with ``--ds-config``, ZeRO-2 by default, as one rank of
one, micro-batch = global batch = ``--batch``; bf16 weights when ``--dtype bfloat16``), its EMA
and ``Engine.train_step`` on random tokens.

Each configuration runs in a fresh process, so its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated``, on a CPU the peak RSS above the RSS before the
model was built (weights, AdamW state, activations, allocator slack).

CPU defaults use a reduced batch; on a GPU: ``--device cuda --batch 8 --seq-len 1024``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import logging
import multiprocessing
import os
import resource
import time
from pathlib import Path

import torch
from timing import sync, timed  # benchmarks/timing.py (this script's folder is on sys.path)

from pgm_dist.attention.interface import available_backends
from pgm_dist.common.distributed import dist_env, release_shared_memory
from pgm_dist.common.zero import zero_stage
from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.flops import peak_flops, training_flops_per_token
from pgm_dist.training.components import objective_for

ON_OFF = {"off": False, "on": True}
ENGINES = ("plain", "deepspeed")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=["plain"],
                   help="plain: torch AdamW under autocast; deepspeed: pgm_dist's Engine as one rank")
    p.add_argument("--ds-config", default="ds_configs/zero2.json", help="DeepSpeed config of the deepspeed engine")
    p.add_argument("--presets", nargs="+", default=["pgm-tiny", "pgm-small"])
    p.add_argument("--backends", nargs="+", default=sorted(available_backends(), key=lambda b: b != "reference"),
                   help="attention backends; the first is the baseline of the speed-up column")
    p.add_argument("--loss-chunks", nargs="+", type=int, default=[0, ModelConfig.loss_chunk],
                   help="tokens per chunk of the output projection + cross-entropy (0: unchunked, dense)")
    p.add_argument("--fused", nargs="+", choices=ON_OFF, default=["off", "on"],
                   help="chunked loss: on = the fused op (gradients made in the forward pass), off = chunks "
                        "recomputed in backward; a chunk of 0 is one dense row")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations, interleaved (each a fresh process); the table shows "
                        "the median tokens/s and the largest peak memory of each")
    p.add_argument("--checkpointing", nargs="+", choices=ON_OFF, default=["off", "on"],
                   help="activation checkpointing per block")
    p.add_argument("--compile", nargs="+", choices=ON_OFF, default=["off"], help="torch.compile of the model")
    p.add_argument("--vocab-size", type=int, default=50258)
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--seq-len", type=int, default=1024 if cuda else 256)
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16" if cuda else "float32")
    p.add_argument("--target-mfu", type=float, metavar="FRACTION",
                   help="print whether the best row reaches this MFU (0.4: 40%%; needs a GPU of known peak)")
    args = p.parse_args(argv)
    if "deepspeed" in args.engines and not os.path.isfile(args.ds_config):
        p.error(f"--ds-config {args.ds_config}: no such file (run from the repository root)")
    return args


def matmul_rate(device, dtype, n=2048 if torch.cuda.is_available() else 1024, reps=5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / timed(lambda: a @ b, device, reps)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plain_step(model, config, args, device, dtype):
    """A step function of a torch AdamW over ``model`` under autocast to ``dtype``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = objective_for(config)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def step(_):
        t = torch.rand(args.batch, device=device, generator=generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = objective.loss(model, tokens, t, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def engine_step(model, config, args, device, compile):
    """``pgm_dist.training.engine.Engine`` over ``model`` as the only rank (this process's own process
    group) and its step function; returns the module it trains and the step."""
    import deepspeed

    from pgm_dist.common.distributed import dist_env, init_process_group
    from pgm_dist.training.config import TrainConfig
    from pgm_dist.training.engine import Engine
    from pgm_dist.training.setup import run_ds_config

    deepspeed.utils.logger.setLevel(logging.WARNING)
    env = dist_env()
    init_process_group(device)
    cfg = TrainConfig(ds_config=args.ds_config, micro_batch=args.batch, global_batch=args.batch,
                      loss_chunk=config.loss_chunk, fused_loss=config.fused_loss,
                      activation_checkpointing=config.activation_checkpointing,
                      compile=compile, warmup_steps=0)
    ds_config = run_ds_config(cfg, env.world_size, device)
    ds_config["bf16"]["enabled"] = args.dtype == "bfloat16"
    engine = Engine(model, objective_for(config), cfg, ds_config, env, device)
    batches = itertools.repeat(torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device))
    return engine.module, lambda step: engine.train_step(batches, step)


def step_rate(engine: str, preset: str, backend: str, loss_chunk: int, fused: bool, checkpointing: bool,
              compile: bool, args) -> tuple[float, float, float]:
    """Run in a fresh process: (tokens/s, model FLOP/s, peak memory in bytes)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rss_before = _rss_bytes()
    config = ModelConfig.preset(preset, vocab_size=args.vocab_size, seq_len=args.seq_len, attention=backend,
                                loss_chunk=loss_chunk, fused_loss=fused, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if engine == "deepspeed":
        model, step = engine_step(model, config, args, device, compile)
    else:
        if compile:
            model.compile()
        model, step = plain_step(model, config, args, device, dtype)
    for i in range(2):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(2, 2 + args.steps):
        step(i)
    sync(device)
    tokens_per_s = args.steps * args.batch * args.seq_len / (time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss: KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    if engine == "deepspeed":  # DeepSpeed's CPU all-reduce buffer in /dev/shm, never deleted by DeepSpeed
        release_shared_memory(dist_env())
    return tokens_per_s, tokens_per_s * training_flops_per_token(model, config), peak


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rate = matmul_rate(device, dtype)
    gpu_peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    print(f"device {device}, {args.dtype}, batch {args.batch} x L {args.seq_len}, V {args.vocab_size}; "
          f"dense matmul rate measured here: {rate / 1e12:.3f} TFLOP/s"
          + (f"; MFU against a bf16 peak of {gpu_peak / 1e12:.0f} TFLOP/s" if gpu_peak else ""))
    if "deepspeed" in args.engines:
        stage = zero_stage(json.loads(Path(args.ds_config).read_text()))
        print(f"engine deepspeed: pgm_dist.training.engine.Engine, {args.ds_config} (ZeRO-{stage}) as one rank, "
              f"micro-batch = global batch = {args.batch}, {'bf16' if args.dtype == 'bfloat16' else 'fp32'} weights")
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS+ MiB"
    print(f"{'engine':<9} {'preset':<12} {'backend':<10} {'chunk':>6} {'fused':>5} {'ckpt':>4} {'comp':>4} "
          f"{'tokens/s':>10} {'TFLOP/s':>8} {'of matmul':>9} {'MFU':>6} {memory:>14} {'vs first':>8}")
    # A fresh process per configuration: its peak memory, compile caches and process group are its own;
    # with --repeats the configurations take turns, so a slow spell of the machine hits them alike.
    spawn = multiprocessing.get_context("spawn")
    rows = []
    for preset in args.presets:
        configs = [(engine, backend, chunk, fused if chunk else "-", ckpt, comp) for engine, backend, chunk, fused,
                   ckpt, comp in itertools.product(args.engines, args.backends, args.loss_chunks, args.fused,
                                                   args.checkpointing, args.compile)]
        configs = list(dict.fromkeys(configs))  # a dense row once, whatever --fused says
        results = {config: [] for config in configs}
        for _ in range(args.repeats):
            for config in configs:
                engine, backend, chunk, fused, ckpt, comp = config
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    results[config].append(pool.submit(step_rate, engine, preset, backend, chunk,
                                                       ON_OFF.get(fused, True), ON_OFF[ckpt], ON_OFF[comp],
                                                       args).result())
        baseline = None
        for config, measured in results.items():
            tokens_per_s, flops, _ = sorted(measured)[len(measured) // 2]  # the median by tokens/s
            peak = max(m[2] for m in measured)
            baseline = baseline or tokens_per_s
            mfu = flops / gpu_peak if gpu_peak else None
            engine, backend, chunk, fused, ckpt, comp = config
            name = f"{engine:<9} {preset:<12} {backend:<10} {chunk:>6} {fused:>5} {ckpt:>4} {comp:>4}"
            rows.append((name, mfu))
            print(f"{name} {tokens_per_s:>10,.0f} {flops / 1e12:>8.3f} {flops / rate:>9.1%} "
                  f"{'-' if mfu is None else f'{mfu:.1%}':>6} {peak / 2**20:>14,.0f} {tokens_per_s / baseline:>7.2f}x",
                  flush=True)
    if args.target_mfu is not None:
        print(mfu_verdict(rows, args.target_mfu, device))


def mfu_verdict(rows: list[tuple[str, float | None]], target: float, device: torch.device) -> str:
    """One line: whether the best of ``rows`` ((configuration, MFU or None)) reaches ``target``."""
    known = [(mfu, name) for name, mfu in rows if mfu is not None]
    if not known:
        return f"MFU TARGET (>= {target:.0%}): not checked, no bf16 peak known for {device}"
    best, name = max(known)
    verdict = "MET" if best >= target else "NOT MET"
    return f"MFU TARGET (>= {target:.0%}): {verdict}, best {best:.1%} ({' '.join(name.split())})"


if __name__ == "__main__":
    main()
