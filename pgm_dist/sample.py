"""``python -m pgm_dist.sample --model DIR``: samples from the EMA weights of an export or a checkpoint.

Text models print ``--num`` texts (``--prompt``: PGM only). Image models write a PNG grid to
``--out``, one row per class of ``--classes`` with ``--num`` pictures each, drawn by the Halton
sampler with classifier-free guidance ``--cfg`` (pixels through the data's VQ decoder, or the
grey levels themselves for the digits)."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pgm_dist.checkpoints.load import image_decoder_path, load_model
from pgm_dist.common.cli import HelpFormatter, default_device, run_cli
from pgm_dist.images.pictures import pixel_decoder, sample_pictures, save_grid
from pgm_dist.sampling import generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.sample", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="an export, a checkpoint, a run folder, or a released reference .ckpt file")
    parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                        help="a released .ckpt file's tokenizer (default: gpt2; Hugging Face name, folder or "
                             "tokenizer.json)")
    parser.add_argument("--num", type=int, default=4, help="texts to sample (images: pictures per class)")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps")
    parser.add_argument("--prompt", default=None, help="text the samples start with (PGM only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="text: divides the logits; images: multiplies them, halved on the first step "
                             "(the reference's image sampler)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (text)")
    parser.add_argument("--device", default=default_device(), help="torch device")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="images: one row per class (default: the first 10 classes)")
    parser.add_argument("--cfg", type=float, default=2.0, help="images: classifier-free guidance weight w")
    parser.add_argument("--cfg-ramp", choices=("linear", "constant"), default="linear",
                        help="images: w_k from 0 to w over the steps, or w at every step")
    parser.add_argument("--order", choices=("halton", "random"), default="halton", help="images: order the cells are revealed in")
    parser.add_argument("--scale", type=int, default=None, help="images: pixels per pixel in the PNG (default: 64 / grid height, at least 1)")
    parser.add_argument("--out", default="samples.png", help="images: the PNG grid written")
    return parser


def sample_images(loaded, args) -> str:
    config = loaded.config
    classes = args.classes if args.classes is not None else list(range(min(10, config.num_classes)))
    bad = [c for c in classes if not 0 <= c <= config.num_classes]
    if bad:
        raise ValueError(f"--classes {bad}: this model has classes 0..{config.num_classes - 1} "
                         f"({config.num_classes} = unconditional)")
    decode = pixel_decoder(image_decoder_path(loaded), args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    pixels = sample_pictures(loaded.model, classes, args.num, args.steps, decode, cfg=args.cfg,
                             cfg_ramp=args.cfg_ramp, temperature=args.temperature, order=args.order,
                             generator=generator)
    seconds = time.perf_counter() - start
    path = save_grid(pixels, args.out, scale=args.scale or max(1, 64 // pixels.shape[2]))
    images = len(classes) * args.num
    return (f"{images} pictures ({len(classes)} classes x {args.num}) in {args.steps} steps, guidance {args.cfg}: "
            f"{seconds:.2f} s ({images / seconds:,.1f} images/s) -> {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: sample(args))


def sample(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, args.device, tokenizer=args.tokenizer)
    if loaded.config.image_grid is not None:
        print(sample_images(loaded, args))
        return
    prompt = None
    if args.prompt:
        ids = loaded.tokenizer.encode(args.prompt)
        if len(ids) >= loaded.config.seq_len - 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {loaded.config.seq_len - 2} fit")
        prompt = [(position + 1, token) for position, token in enumerate(ids)]  # after BOS
    generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    tokens = generate(loaded.model, args.num, args.steps, prompt=prompt, temperature=args.temperature,
                      top_p=args.top_p, generator=generator)
    seconds = time.perf_counter() - start
    for i, row in enumerate(tokens):
        print(f"--- sample {i} ---\n{loaded.tokenizer.decode(row.tolist())}")
    print(f"\n{args.num} x {loaded.config.seq_len} tokens in {args.steps} steps: {seconds:.2f} s "
          f"({tokens.numel() / seconds:,.0f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
