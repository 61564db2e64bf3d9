"""PGM's efficient sampler beside MDLM's ancestral sampler, measured in one run.

Equal steps, batch and length; matched budgets (PGM 6/6 vs MDLM 12 blocks at equal
width by default). Prints tokens/s of each (``batch * L / wall time``, after a
warm-up) and the ratio. The paper reports 5.3x on a GPU at batch 32, L 1024,
128 steps: ``python benchmarks/sampling.py --batch 32 --seq-len 1024 --steps 128 --device cuda``.
"""
from __future__ import annotations

import argparse

import torch
from timing import timed  # benchmarks/timing.py (this script's folder is on sys.path)

from pgm_dist.common.cli import default_device
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import ModelConfig
from pgm_dist.sampling import sample_mdlm, sample_pgm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pgm", default="pgm-small", help="PGM preset (default: pgm-small, 6/6 blocks)")
    p.add_argument("--mdlm", default="mdlm-small", help="MDLM preset (default: mdlm-small, 12 blocks)")
    p.add_argument("--vocab-size", type=int, default=50258, help="vocabulary size (default: GPT-2's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per sampler (the best is kept)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--attention", default="auto", help="attention backend of both models")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = []
    for name, preset, sampler in (("MDLM", args.mdlm, sample_mdlm), ("PGM", args.pgm, sample_pgm)):
        config = ModelConfig.preset(preset, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                    attention=args.attention)
        torch.manual_seed(args.seed)
        model = build_model(config).to(device=device, dtype=dtype).eval()

        def run(steps=args.steps):
            generator = torch.Generator(device).manual_seed(args.seed)
            sampler(model, args.batch, steps, generator=generator)

        run(steps=2)  # warm-up
        seconds = min(timed(run, device) for _ in range(args.repeats))
        rows.append(dict(model=name, preset=preset, params_m=count_parameters(model) / 1e6, seconds=seconds,
                         tokens_per_s=args.batch * args.seq_len / seconds))
    baseline = rows[0]["tokens_per_s"]
    print(f"device {device}, dtype {dtype}, batch {args.batch}, L {args.seq_len}, steps {args.steps}")
    print(f"{'sampler':<8} {'preset':<14} {'params (M)':>10} {'wall (s)':>9} {'tokens/s':>10} {'vs MDLM':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['preset']:<14} {r['params_m']:>10.1f} {r['seconds']:>9.2f} "
              f"{r['tokens_per_s']:>10.1f} {r['tokens_per_s'] / baseline:>7.2f}x")
    print(f"SAMPLING PGM / MDLM: {rows[1]['tokens_per_s'] / baseline:.2f}x tokens/s (the paper: 5.3x on a GPU at "
          "batch 32, L 1024, 128 steps)")
    return rows


if __name__ == "__main__":
    main()
