"""``python -m pgm_dist.export --ckpt DIR --out DIR``: EMA weights as safetensors + config +
tokenizer, loadable without DeepSpeed (``pgm_dist.checkpoints.load.load_model``)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pgm_dist.checkpoints.load import image_decoder_path, load_model, save_export, training_data_folder
from pgm_dist.common.cli import HelpFormatter, run_cli
from pgm_dist.data.shards import TOKENIZER_FILE, VQ_FILE


def export(ckpt: str | Path, out: str | Path) -> Path:
    if Path(ckpt).is_file():
        raise ValueError(f"{ckpt} is a file, not a checkpoint folder: a released reference checkpoint converts "
                         f"with `python -m pgm_dist.convert reference {ckpt} --out {out}`")
    loaded = load_model(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = training_data_folder(loaded.info)
    if data is not None and data.is_dir():
        data = data.resolve()  # so that `evaluate --model EXPORT` finds it from any folder
    if loaded.tokenizer is not None:
        shutil.copyfile(loaded.source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    else:  # an image model: its pictures need the data folder's VQ decoder, if it has one
        vq = image_decoder_path(loaded)
        if vq is not None:
            shutil.copyfile(vq, out / VQ_FILE)
    return save_export(out, loaded.model.state_dict(), {
        "model_config": loaded.config.to_dict(), "tokenizer_sha256": loaded.info["tokenizer_sha256"],
        "step": loaded.info.get("step"), "data_meta": loaded.info.get("data_meta"),
        "data": str(data) if data is not None else None,
        "exported_from": str(loaded.source)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.export", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(f"exported EMA weights, config and tokenizer to {export(args.ckpt, args.out)}"))


if __name__ == "__main__":
    sys.exit(main())
