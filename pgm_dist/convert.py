"""``python -m pgm_dist.convert reference CKPT --out DIR``: one of the authors' released text
checkpoints (``jdeschena/pgm`` on the Hugging Face Hub: ``pgm_8_8.ckpt``, ``pgm_6_6_dim1024.ckpt``,
``mdlm.ckpt`` and their ``*_sdtt_*`` students) as an export of this project: ``model.safetensors``,
``config.json`` and the tokenizer, which ``sample``, ``evaluate``, ``distill --teacher`` and
``from pgm_dist import load_model`` read. The mapping is exact (pgm_dist/checkpoints/reference.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgm_dist.checkpoints.load import REFERENCE_TOKENIZER, load_reference_model, save_export
from pgm_dist.checkpoints.reference import RELEASE_LENGTH
from pgm_dist.common.cli import HelpFormatter, run_cli
from pgm_dist.data.shards import TOKENIZER_FILE
from pgm_dist.data.tokenizer import tokenizer_file


def convert_reference(ckpt: str | Path, out: str | Path, weights: str = "ema", tokenizer: str | None = None,
                      seq_len: int = RELEASE_LENGTH) -> Path:
    loaded = load_reference_model(ckpt, tokenizer=tokenizer, weights=weights, seq_len=seq_len)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = tokenizer_file(tokenizer or REFERENCE_TOKENIZER, out / TOKENIZER_FILE)
    assert written.sha256 == loaded.tokenizer.sha256
    return save_export(out, loaded.model.state_dict(), {
        "model_config": loaded.config.to_dict(), "tokenizer_sha256": written.sha256, "step": loaded.info["step"],
        "data_meta": None, "data": None, "exported_from": str(Path(ckpt).resolve()),
        "reference": loaded.info["reference"]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.convert", description=__doc__,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("reference", formatter_class=HelpFormatter, help="a released checkpoint file -> an export",
                            description="Convert a released checkpoint file into an export folder.")
    r.add_argument("ckpt", type=Path, help="the .ckpt file (huggingface-cli download jdeschena/pgm pgm_8_8.ckpt)")
    r.add_argument("--out", type=Path, required=True, help="the export folder written")
    r.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (the paper's perplexities and samples) or the raw ones (its lm-eval "
                        "numbers, and what its SDTT distils from)")
    r.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help=f"the model's tokenizer: a Hugging Face name, folder or tokenizer.json, or a data folder's "
                        f"tokenizer.model (default: {REFERENCE_TOKENIZER}, from the transformers cache or the Hub)")
    r.add_argument("--seq-len", type=int, default=RELEASE_LENGTH,
                   help="the sequence length the model reads (the released models: 1024)")
    args = parser.parse_args(argv)

    def run() -> None:
        out = convert_reference(args.ckpt, args.out, args.weights, args.tokenizer, args.seq_len)
        print(f"converted {args.ckpt} ({args.weights} weights) to {out}")
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
