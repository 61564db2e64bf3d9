"""``python -m pgm_dist.data build --out DIR [...]``: build tokenized WebDataset shards;
``python -m pgm_dist.data build-images --digits | --vq PATH --input FOLDER --out DIR``: image shards;
``python -m pgm_dist.data build-synthetic --out DIR [...]``: shards of a Markov source whose likelihood is known."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgm_dist.common.cli import HelpFormatter, run_cli
from pgm_dist.data.builder import AUTO_MIN_TRAIN_SHARDS, DEFAULT_SAMPLES_PER_SHARD, BuildSettings, build
from pgm_dist.data.documents import HFDatasetInput
from pgm_dist.data.synthetic import SyntheticSettings, build_synthetic
from pgm_dist.images.data import add_build_images_parser, build_images_command


def main(argv=None) -> int:
    defaults = BuildSettings()
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.data", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="tokenize documents into shards (default input: the Python stdlib)",
                            description="Tokenize documents into shards.", formatter_class=HelpFormatter)
    b.add_argument("--out", type=Path, required=True, help="output folder (e.g. data_shards/mycorpus)")
    b.add_argument("--input", type=Path, nargs="+", action="extend", default=None,
                   help="files or folders of .txt/.md/.py/.jsonl documents, optionally .gz, and .parquet "
                        "(default: the Python standard library's source)")
    b.add_argument("--hf-dataset", default=None, metavar="NAME_OR_FOLDER",
                   help="a Hugging Face dataset instead of --input, streamed (never copied to disk): a Hub name "
                        "(openwebtext) resolved from the cache or the Hub, or a local dataset folder")
    b.add_argument("--hf-config", default=None, help="--hf-dataset: its configuration name")
    b.add_argument("--hf-split", default="train", help="--hf-dataset: the split read")
    b.add_argument("--hf-revision", default=None, help="--hf-dataset: a Hub revision (branch, tag or commit)")
    b.add_argument("--text-field", default=defaults.text_field,
                   help="the field of a .jsonl line / the column of a .parquet file that holds the text")
    b.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="sentencepiece vocabulary size")
    b.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per block, BOS and EOS included")
    b.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="fraction of documents held out for validation")
    b.add_argument("--samples-per-shard", type=int, default=None,
                   help=f"blocks per shard (default: {DEFAULT_SAMPLES_PER_SHARD}, or train blocks // "
                        f"{AUTO_MIN_TRAIN_SHARDS} for a corpus that would fill fewer than {AUTO_MIN_TRAIN_SHARDS} "
                        "train shards, so that it splits over that many ranks x loader workers)")
    b.add_argument("--tokenizer", type=Path, default=None,
                   help="an existing tokenizer file to use instead of training one: a sentencepiece .model, or "
                        "another data folder's tokenizer.model")
    b.add_argument("--hf-tokenizer", default=None, metavar="NAME_OR_PATH",
                   help="a Hugging Face tokenizer instead of training one: a name transformers resolves from its "
                        "cache or the Hub (gpt2, as the paper's text models), a tokenizer folder, or a "
                        "tokenizer.json; documents end with its EOS, blocks are [BOS] ... [EOS] (GPT-2: "
                        "<|endoftext|> as both), as the reference prepares OpenWebText")
    b.add_argument("--model-type", choices=("bpe", "unigram"), default=defaults.model_type,
                   help="sentencepiece model type when training one")
    b.add_argument("--workers", type=int, default=defaults.workers, help="tokenizer processes")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_build_images_parser(commands)
    add_build_synthetic_parser(commands)
    args = parser.parse_args(argv)
    commands = {"build": build_text, "build-images": build_images_command, "build-synthetic": build_synthetic_command}
    return run_cli(lambda: commands[args.command](args))


def add_build_synthetic_parser(commands) -> None:
    defaults = SyntheticSettings()
    s = commands.add_parser(
        "build-synthetic", formatter_class=HelpFormatter,
        help="shards of a random sparse Markov source with a known likelihood (exact sample evaluation)",
        description="Shards of a random sparse Markov source (BOS, then one chain per sequence), its tables in "
                    "DIR/source.npz: python -m pgm_dist.evaluate then scores a model's samples exactly under it.")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--vocab", type=int, default=defaults.vocab, help="symbols (the model's vocabulary adds BOS, EOS)")
    s.add_argument("--order", type=int, choices=(1, 2), default=defaults.order, help="Markov order")
    s.add_argument("--successors", type=int, default=defaults.successors, help="likely successors of each state")
    s.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence, BOS included")
    s.add_argument("--seed", type=int, default=defaults.seed, help="the source's and the samples' seed")
    s.add_argument("--smoothing", type=float, default=defaults.smoothing,
                   help="probability mass every state spreads over all symbols")
    s.add_argument("--train-sequences", type=int, default=defaults.train_sequences, help="training sequences")
    s.add_argument("--val-sequences", type=int, default=defaults.val_sequences, help="validation sequences")
    s.add_argument("--samples-per-shard", type=int, default=None, help="sequences per shard (default: automatic)")


def build_synthetic_command(args: argparse.Namespace) -> None:
    build_synthetic(args.out, SyntheticSettings(
        vocab=args.vocab, order=args.order, successors=args.successors, seq_len=args.seq_len, seed=args.seed,
        smoothing=args.smoothing, train_sequences=args.train_sequences, val_sequences=args.val_sequences,
        samples_per_shard=args.samples_per_shard))


def build_text(args: argparse.Namespace) -> None:
    hf_dataset = None
    if args.hf_dataset:
        hf_dataset = HFDatasetInput(args.hf_dataset, args.hf_config, args.hf_split, args.hf_revision)
    settings = BuildSettings(vocab_size=args.vocab_size, seq_len=args.seq_len, val_fraction=args.val_fraction,
                             samples_per_shard=args.samples_per_shard, tokenizer=args.tokenizer,
                             hf_tokenizer=args.hf_tokenizer, text_field=args.text_field, hf_dataset=hf_dataset,
                             workers=args.workers, model_type=args.model_type)
    build(args.out, args.input, settings, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
