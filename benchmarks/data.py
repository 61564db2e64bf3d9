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
    p.add_argument("--builder-workers", type=int, nargs="+", default=None,
                   help="time the builder alone at these --workers (tokenizers and inputs as the docstring says)")
    p.add_argument("--docs", type=int, default=3000, help="documents of the corpus for --builder-workers")
    p.add_argument("--repeat", type=int, default=4,
                   help="--builder-workers: the documents this many times (the standard library alone is ~1,900 "
                        "documents, seconds of work: start-up would dominate)")
    return p.parse_args(argv)


def builder_scaling(workers: list[int], docs: int, seq_len: int, vocab: int, repeat: int = 1
                    ) -> list[tuple[str, float, float, float]]:
    """(setting, tokens/s, tokens/s per worker, speed-up over the first worker count) per build."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from pgm_dist.data.documents import default_corpus_paths, iter_documents, list_files
    from pgm_dist.data.tokenizer import train_tokenizer, write_hf_tokenizer

    texts = [doc.text for _, doc in zip(range(docs), iter_documents(list_files(default_corpus_paths())))]
    corpus = texts * repeat  # the tokenizers train on one copy
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {"jsonl": tmp / "jsonl", "parquet": tmp / "parquet", "hf dataset": tmp / "hf"}
        inputs["jsonl"].mkdir()
        (inputs["jsonl"] / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus))
        for kind in ("parquet", "hf dataset"):
            folder = inputs[kind] / ("data" if kind == "hf dataset" else "")
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": corpus}), folder / "train-00000-of-00001.parquet", row_group_size=512)
        spm = train_tokenizer(iter(texts), tmp / "spm.model", vocab).path
        bpe = BackendTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab - 1,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        bpe.add_special_tokens(["<|endoftext|>"])
        bpe.save(str(tmp / "bpe.json"))
        hf = write_hf_tokenizer(tmp / "hf.model", str(tmp / "bpe.json")).path
        for tokenizer, path in (("sentencepiece", spm), ("byte-level BPE (HF)", hf)):
            for kind, folder in inputs.items():
                if tokenizer == "sentencepiece" and kind != "jsonl":
                    continue  # the input kind is timed with one tokenizer
                base = None
                for n in workers:
                    source = ({"hf_dataset": {"name": str(folder)}} if kind == "hf dataset" else {})
                    settings = BuildSettings(seq_len=seq_len, samples_per_shard=256, tokenizer=path, workers=n,
                                             val_fraction=0.01, **source)
                    out = tmp / f"out-{tokenizer[:4]}-{kind[:3]}-{n}"
                    start = time.perf_counter()
                    meta = build(out, None if kind == "hf dataset" else [folder], settings, progress=False,
                                 log=lambda *_: None)
                    rate = (meta.train.tokens + meta.val.tokens) / (time.perf_counter() - start)
                    base = base or rate
                    rows.append((f"{tokenizer}, {kind}, {n} worker(s)", rate, rate / n, rate / base))
    return rows


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
    if args.builder_workers:
        print(f"builder on the first {args.docs} documents of the built-in corpus x {args.repeat}, L {args.seq_len}, "
              f"V {args.vocab_size}")
        print(f"{'setting':<44} {'tokens/s':>10} {'per worker':>11} {'vs first':>9}")
        for name, rate, per_worker, speedup in builder_scaling(args.builder_workers, args.docs, args.seq_len,
                                                               args.vocab_size, args.repeat):
            print(f"{name:<44} {rate:>10,.0f} {per_worker:>11,.0f} {speedup:>8.2f}x")
        return
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
