"""``python -m pgm_dist.sample --model DIR --num N --steps K [--prompt TEXT] [--seed S]``:
print texts sampled with the EMA weights of an export or a checkpoint."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pgm_dist.cli import HelpFormatter
from pgm_dist.sampling import generate


def main(argv=None) -> int:
    from pgm_dist.artifacts import load_model

    parser = argparse.ArgumentParser(prog="python -m pgm_dist.sample", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="an export, a checkpoint, or a run folder")
    parser.add_argument("--num", type=int, default=4, help="texts to sample")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps")
    parser.add_argument("--prompt", default=None, help="text the samples start with (PGM only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the draws")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.model, args.device)
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
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, row in enumerate(tokens):
        print(f"--- sample {i} ---\n{loaded.tokenizer.decode(row.tolist())}")
    print(f"\n{args.num} x {loaded.config.seq_len} tokens in {args.steps} steps: {seconds:.2f} s "
          f"({tokens.numel() / seconds:,.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
