"""``python -m pgm_dist.convert reference CKPT --out DIR``: one of the authors' released
checkpoints (``jdeschena/pgm`` on the Hugging Face Hub: ``pgm_8_8.ckpt``, ``pgm_6_6_dim1024.ckpt``,
``mdlm.ckpt`` and their ``*_sdtt_*`` students; the image PGMs ``images_pgm_12_12_100epochs.ckpt``
and ``images_pgm_14_10_100epochs.ckpt``) as an export of this project: ``model.safetensors``,
``config.json`` and the tokenizer (text) or the VQ decoder (images, ``--vq``), which ``sample``,
``evaluate``, ``distill --teacher`` and ``from pgm_dist import load_model`` read. The mapping is
exact (pgm_dist/checkpoints/reference.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgm_dist.checkpoints.load import REFERENCE_TOKENIZER, load_reference_model, save_export
from pgm_dist.checkpoints.reference import RELEASE_LENGTH
from pgm_dist.common.cli import HelpFormatter, run_cli
from pgm_dist.data.shards import TOKENIZER_FILE, VQ_FILE
from pgm_dist.images.vq import load_vq, save_vq


def convert_reference(ckpt: str | Path, out: str | Path, weights: str = "auto", tokenizer: str | None = None,
                      seq_len: int = RELEASE_LENGTH, vq: str | Path | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a text model's tokenizer is resolved once, straight into the export
    loaded = load_reference_model(ckpt, tokenizer=tokenizer, weights=weights, seq_len=seq_len,
                                  tokenizer_out=out / TOKENIZER_FILE)
    info = {"model_config": loaded.config.to_dict(), "step": loaded.info["step"], "data_meta": None, "data": None,
            "exported_from": str(Path(ckpt).resolve()), "reference": loaded.info["reference"]}
    if loaded.tokenizer is not None:
        info["tokenizer_sha256"] = loaded.tokenizer.sha256
    else:  # an image model: its codes' decoder, if given, travels with it
        info.update(tokenizer_sha256=None, data_meta=loaded.info["data_meta"])
        if vq is not None:  # its config from its shapes (VQ-8 for the released models)
            model = load_vq(vq)
            codebook = loaded.config.vocab_size - 1
            if model.config.codebook_size != codebook:
                raise ValueError(f"the VQ model {vq} has {model.config.codebook_size} codes, the image model "
                                 f"{ckpt} predicts {codebook}: pass the VQ it was trained on (LlamaGen's VQ-8)")
            save_vq(model, out / VQ_FILE)
            info["data_meta"]["image"]["vq"] = model.config.to_dict()
    return save_export(out, loaded.model.state_dict(), info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.convert", description=__doc__,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("reference", formatter_class=HelpFormatter, help="a released checkpoint file -> an export",
                            description="Convert a released checkpoint file into an export folder.")
    r.add_argument("ckpt", type=Path, help="the .ckpt file (huggingface-cli download jdeschena/pgm pgm_8_8.ckpt)")
    r.add_argument("--out", type=Path, required=True, help="the export folder written")
    r.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="a text model's EMA weights (the paper's perplexities and samples) or its raw ones (its "
                        "lm-eval numbers, and what its SDTT distils from); auto: EMA for text, raw for the image "
                        "models (all their files hold)")
    r.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help=f"the model's tokenizer: a Hugging Face name, folder or tokenizer.json, or a data folder's "
                        f"tokenizer.model (default: {REFERENCE_TOKENIZER}, from the transformers cache or the Hub)")
    r.add_argument("--seq-len", type=int, default=RELEASE_LENGTH,
                   help="a text model's sequence length (the released models: 1024)")
    r.add_argument("--vq", type=Path, default=None,
                   help="image models: LlamaGen's VQ-8 weights (vq_ds8_c2i.pt), copied into the export as "
                        "vq.safetensors so that `sample` draws pictures")
    args = parser.parse_args(argv)

    def run() -> None:
        out = convert_reference(args.ckpt, args.out, args.weights, args.tokenizer, args.seq_len, args.vq)
        print(f"converted {args.ckpt} ({args.weights} weights) to {out}")
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
