"""Throughput of the shard builder and of the streaming loader (1 and 2 workers).

Builds the built-in corpus (the Python standard library) into a temporary folder,
timing the builder, then streams its train shards. For scale: one H100-class GPU
training ``pgm-small`` consumes about 300k tokens/s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pgm_dist.data.builder import BuildSettings, build
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="an existing data folder to stream (default: build the built-in corpus, timing it)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=200, help="batches timed per loader setting")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    return p.parse_args(argv)


def time_loader(folder: DataFolder, workers: int, micro_batch: int, batches: int) -> float:
    loader = TrainLoader(folder.train_sources, seq_len=folder.meta.seq_len, micro_batch=micro_batch,
                         num_workers=workers, samples_per_shard=folder.meta.samples_per_shard)
    stream = iter(loader)
    next(stream)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * micro_batch * folder.meta.seq_len / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "default"
            start = time.perf_counter()
            meta = build(data, None, BuildSettings(vocab_size=args.vocab_size, seq_len=args.seq_len,
                                                   samples_per_shard=256), progress=False, log=lambda *_: None)
            seconds = time.perf_counter() - start
            rows.append(("builder (2 processes, incl. tokenizer training)", (meta.train.tokens + meta.val.tokens) / seconds))
        folder = DataFolder.open(data)
        for workers in args.workers:
            rows.append((f"loader, {workers} worker(s)", time_loader(folder, workers, args.micro_batch, args.batches)))
    reference = 300_000
    print(f"{'what':<50} {'tokens/s':>12} {'vs 300k tok/s (1 H100, pgm-small)':>34}")
    for name, rate in rows:
        print(f"{name:<50} {rate:>12,.0f} {rate / reference:>33.1f}x")


if __name__ == "__main__":
    main()
