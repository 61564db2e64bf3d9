"""Image sampling: a class-conditional PGM's Halton sampler beside a MaskGIT-style baseline
(a full-length masked model, MDLM, same order, arccos counts and guidance) at equal steps,
measured in one run; plus, given a trained digits model, the class accuracy and diversity of
its samples per step count and guidance weight.

Speed: random weights, images/s of each sampler (after a warm-up, best of ``--repeats``) and
the PGM / baseline ratio, on the digits grid (8x8, 17 codes, 10 classes) and on a 32x32 grid
of a 16,384-code book with 1000 classes (the paper's ImageNet 256 setting: 7.5x there, on a
GPU with the reference's 12 + 12 model). The baseline has the PGM's width and total depth.
GPU: ``python benchmarks/image_sampling.py --device cuda --pgm pgm-img-b --batch 64 --steps 32``.

Quality (``--model RUN_OR_EXPORT`` of a digits model): the digits classifier's accuracy on
``--per-class`` samples of each digit and their mean within-class pixel distance, for each
``--quality-steps`` x ``--cfgs``.
"""
from __future__ import annotations

import argparse

import torch
from timing import timed  # benchmarks/timing.py (this script's folder is on sys.path)

from pgm_dist.common.cli import default_device
from pgm_dist.images.sampling import sample_image_mdlm, sample_image_pgm
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import ModelConfig

GRIDS = {"digits": (8, 17, 10), "32x32": (32, 16384, 1000)}  # side, codebook, classes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pgm", default="pgm-img-tiny", help="image PGM preset (pgm-img-b: the reference's)")
    p.add_argument("--grids", nargs="+", choices=GRIDS, default=list(GRIDS))
    p.add_argument("--batch", type=int, default=32, help="images per sampling call")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=2.0, help="guidance weight (doubles the batch when > 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--model", help="a trained digits model (run folder, checkpoint or export) for the quality table")
    p.add_argument("--quality-steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--cfgs", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--cache", default=".cache/pgm_dist", help="where the digits classifier is cached")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def speed_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for grid in args.grids:
        side, codebook, classes = GRIDS[grid]
        shape = dict(vocab_size=codebook + 1, seq_len=1 + side * side, num_classes=classes)
        pgm_config = ModelConfig.preset(args.pgm, image_grid=[side, side], **shape)
        # The baseline: the PGM's width, heads, conditioning and total depth in one full-length stack.
        mdlm_config = ModelConfig(arch="mdlm", d_model=pgm_config.d_model, n_heads=pgm_config.n_heads,
                                  n_enc=pgm_config.n_enc + pgm_config.n_dec, n_dec=0, cond_dim=pgm_config.cond_dim,
                                  cond_silu=pgm_config.cond_silu, dropout=0.0, **shape)
        labels = torch.arange(args.batch) % classes
        baseline = None
        for name, config, sampler in (("MaskGIT-style", mdlm_config, sample_image_mdlm),
                                      ("PGM (Halton)", pgm_config, sample_image_pgm)):
            torch.manual_seed(args.seed)
            model = build_model(config).to(device=device, dtype=dtype).eval()

            def run(steps=args.steps):
                generator = torch.Generator(device).manual_seed(args.seed)
                sampler(model, labels, steps, grid=(side, side), cfg=args.cfg, generator=generator)

            run(steps=2)  # warm-up
            seconds = min(timed(run, device) for _ in range(args.repeats))
            images_per_s = args.batch / seconds
            baseline = baseline or images_per_s
            rows.append(dict(grid=f"{side}x{side}", sampler=name, params_m=count_parameters(model) / 1e6,
                             images_per_s=images_per_s, ratio=images_per_s / baseline))
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = speed_rows(args, device, dtype)
    print(f"device {device}, {dtype}, batch {args.batch}, steps {args.steps}, cfg {args.cfg}, PGM {args.pgm}")
    print(f"{'grid':<7} {'sampler':<15} {'params (M)':>10} {'images/s':>10} {'vs baseline':>12}")
    for r in rows:
        print(f"{r['grid']:<7} {r['sampler']:<15} {r['params_m']:>10.1f} {r['images_per_s']:>10.1f} "
              f"{r['ratio']:>11.2f}x")
    quality = []
    if args.model:
        from pgm_dist.checkpoints.load import load_model
        from pgm_dist.images.quality import digits_classifier, digits_quality

        loaded = load_model(args.model, device)
        quality = digits_quality(loaded.model, digits_classifier(args.cache), args.quality_steps, args.cfgs,
                                 per_class=args.per_class, seed=args.seed)
        print(f"\ndigits samples of {loaded.source} ({args.per_class} per class; chance accuracy 0.10; "
              "real validation digits: 0.98)")
        print(f"{'steps':>5} {'cfg':>5} {'accuracy':>9} {'diversity':>10}")
        for q in quality:
            print(f"{q['steps']:>5} {q['cfg']:>5.1f} {q['accuracy']:>9.3f} {q['diversity']:>10.3f}")
    return {"speed": rows, "quality": quality}


if __name__ == "__main__":
    main()
