"""``python -m pgm_dist.evaluate --model DIR [--data DIR]``: validation NELBO and perplexity
with the EMA weights, numbers reproducible with ``--seed``; by default on the validation
shards of the data folder the model was trained on. With ``--eval-model``, samples are scored by a
causal LM (generative perplexity); on a synthetic folder (``python -m pgm_dist.data
build-synthetic``) they are always scored exactly under its Markov source. An image model
reports its validation cross-entropy per code (with the true labels), which its training logs as
``val/nelbo``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pgm_dist.checkpoints.load import image_decoder_path, load_model, training_data_folder
from pgm_dist.common.cli import HelpFormatter, default_device, run_cli
from pgm_dist.common.errors import DataError
from pgm_dist.data.loader import ValidationLoader
from pgm_dist.data.shards import DataFolder
from pgm_dist.data.synthetic import SOURCE_FILE, MarkovSource
from pgm_dist.evaluation.gen_ppl import PROTOCOLS, eval_samplers, load_evaluator, sample_quality
from pgm_dist.evaluation.nelbo import nelbo_and_perplexity, nelbo_sums
from pgm_dist.images.data import ImageFolderListing, list_image_folder
from pgm_dist.images.pictures import pixel_decoder
from pgm_dist.images.quality import load_feature_extractor, model_fid
from pgm_dist.training.components import objective_for
from pgm_dist.training.setup import codec_sha256


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.evaluate", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="an export, a checkpoint, a run folder, or a released reference .ckpt file")
    parser.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                        help="a released .ckpt file's tokenizer (default: gpt2; Hugging Face name, folder or "
                             "tokenizer.json)")
    parser.add_argument("--data", default=None,
                        help="a data folder (its val-*.tar shards) tokenized with the model's tokenizer "
                             "(default: the folder the model was trained on)")
    parser.add_argument("--batches", type=int, default=None, help="at most this many batches (default: all)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=1234, help="validation seed (noise levels, partitions)")
    parser.add_argument("--device", default=default_device(), help="torch device")
    parser.add_argument("--eval-model", default=None,
                        help="also sample --samples sequences in --steps steps and report their unigram entropy and "
                             "generative perplexity under this Hugging Face causal LM folder (pip install -e '.[eval]')")
    parser.add_argument("--samples", type=int, default=16,
                        help="sequences sampled with --eval-model or on a synthetic folder")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps of those samples")
    parser.add_argument("--sampler", default="both", choices=("both", "uniform", "binomial"),
                        help="PGM sampler(s) of the samples: uniform (near-equal chunks), binomial (per-position "
                             "reveals, what SDTT students imitate) or both; MDLM samples with its own")
    parser.add_argument("--gen-ppl-protocol", default="first", choices=PROTOCOLS,
                        help="a sample longer than the evaluator's window: score its first window only (the "
                             "paper's protocol) or strided windows (each token once, with up to a window of context)")
    parser.add_argument("--fid", default=None, metavar="REAL_DIR",
                        help="image models: the FID of samples against the pictures of this folder (one sub-folder "
                             "per class, as ImageNet-val), each sample drawn with a real picture's label; needs "
                             "--features (instead of the validation NELBO)")
    parser.add_argument("--features", default=None, metavar="FILE",
                        help="with --fid: a TorchScript feature network, images [N, 3, 299, 299] in [0, 1] -> "
                             "features [N, D] or (features, logits) (then the Inception Score too); "
                             "benchmarks/inception_features.py writes Inception-v3 pool3")
    parser.add_argument("--num", type=int, default=50_000, help="with --fid: pictures (at most the folder's)")
    parser.add_argument("--cfg", type=float, default=2.0, help="with --fid: classifier-free guidance weight")
    parser.add_argument("--fid-batch", type=int, default=32, help="with --fid: pictures per sampling batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate(args))


def same_image_codes(folder: DataFolder, loaded) -> bool:
    """Whether ``folder`` holds the codes ``loaded`` reads: its checksum (grid, codebook, classes, VQ);
    a converted released model records none: its grid, codebook and classes, and a VQ-8 folder."""
    if loaded.info.get("tokenizer_sha256") is not None:
        return codec_sha256(folder, None) == loaded.info["tokenizer_sha256"]
    image, config = folder.meta.image, loaded.config
    vq = loaded.info["data_meta"]["image"]["vq"]
    return (image["grid"], image["codebook_size"], image["num_classes"]) == (
        config.image_grid, config.vocab_size - 1, config.num_classes) and image["vq"] == vq


def real_labels_as_classes(real: ImageFolderListing, loaded) -> ImageFolderListing:
    """The real pictures labelled by the model's classes: by name when the model records its classes'
    names (a model trained here), else by the sorted sub-folders' order (a released model: ImageNet's
    sorted synsets), which must then be as many as the model's classes."""
    names = ((loaded.info.get("data_meta") or {}).get("image") or {}).get("class_names")
    if names:
        unknown = [name for name in real.class_names if name not in names]
        if unknown:
            raise DataError(f"class sub-folders {', '.join(unknown[:5])} of the real pictures are not classes of the "
                            f"model (its classes: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        return ImageFolderListing(real.files, [names.index(real.class_names[label]) for label in real.labels], names)
    if len(real.class_names) != loaded.config.num_classes:
        raise DataError(f"the real pictures have {len(real.class_names)} class sub-folders, the model "
                        f"{loaded.config.num_classes} classes: their labels are the sorted sub-folders' indices, so "
                        "give a folder with one sub-folder per class of the model")
    return real


def evaluate_fid(loaded, args: argparse.Namespace) -> None:
    if loaded.config.image_grid is None:
        raise DataError("--fid measures pictures: this is a text model")
    if args.features is None:
        raise DataError("--fid needs --features FILE (a TorchScript feature network; "
                        "benchmarks/inception_features.py writes Inception-v3 pool3)")
    decode = pixel_decoder(image_decoder_path(loaded), args.device)
    extractor = load_feature_extractor(args.features, args.device)
    real = real_labels_as_classes(list_image_folder(Path(args.fid)), loaded)
    result = model_fid(loaded.model, decode, real, extractor, num=args.num,
                       steps=args.steps, cfg=args.cfg, batch=args.fid_batch, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    line = (f"model {loaded.source}\nreal pictures {args.fid} ({result['num']}, their labels)\n"
            f"{args.steps} steps, guidance {args.cfg}\nFID {result['fid']:.4f}")
    if "inception_score" in result:
        line += f"\nInception Score {result['inception_score']:.4f} +- {result['inception_score_std']:.4f}"
    print(line)


def evaluate(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, args.device, tokenizer=args.tokenizer)
    if args.fid is not None:
        evaluate_fid(loaded, args)
        return
    image = loaded.config.image_grid is not None
    if image and args.eval_model:
        raise DataError("--eval-model scores texts: an image model's samples are pictures "
                        "(python -m pgm_dist.sample --model ... writes them)")
    evaluator = load_evaluator(args.eval_model, args.device) if args.eval_model else None
    trained_on = training_data_folder(loaded.info)
    if args.data is not None:
        data, origin = args.data, "--data"
    elif trained_on is None:
        raise DataError(f"{loaded.source} does not record the data folder it was trained on "
                        "(an export made before exports did): pass --data DIR")
    elif not trained_on.is_dir():
        raise DataError(f"{loaded.source} was trained on {trained_on}, which does not exist from here "
                        "(a relative path is relative to where training ran): pass --data DIR")
    else:
        data, origin = trained_on, "the folder the model was trained on"
    folder = DataFolder.open(data)
    if image:
        if not folder.is_image or not same_image_codes(folder, loaded):
            raise DataError(f"{data} does not hold the image codes {loaded.source} was trained on (another grid, "
                            "codebook, classes or VQ tokenizer, or a text folder): evaluate on the model's own "
                            "image data folder" + (f" {trained_on}" if trained_on is not None else ""))
    elif folder.meta.tokenizer_sha256 != loaded.tokenizer.sha256:
        raise DataError(f"{data} was tokenized with another tokenizer than the model's "
                        f"({loaded.source / 'tokenizer.model'}): evaluate on data built with "
                        f"`python -m pgm_dist.data build --tokenizer {loaded.source / 'tokenizer.model'}`"
                        + (f", or on the model's own {trained_on}" if trained_on is not None else ""))
    folder.meta.check(seq_len=loaded.config.seq_len)
    batches = ValidationLoader(folder.val_sources, seq_len=folder.meta.seq_len, micro_batch=args.micro_batch,
                               max_batches=args.batches, labels=image)
    total = nelbo_sums(loaded.model, objective_for(loaded.config), batches, torch.device(args.device),
                       args.seed)
    nelbo, ppl = nelbo_and_perplexity(total)
    if image:
        print(f"model {loaded.source}\ndata {folder.path} ({origin})\nvalidation codes {int(total[1].item())}\n"
              f"NELBO {nelbo:.6f} nats/code (the image objective's cross-entropy per code, true labels)\n"
              f"perplexity {ppl:.4f}")
        return
    print(f"model {loaded.source}\ndata {folder.path} ({origin})\nvalidation tokens {int(total[1].item())}\n"
          f"NELBO {nelbo:.6f} nats/token\nperplexity {ppl:.4f}")
    source = MarkovSource.load(folder.path / SOURCE_FILE) if folder.meta.synthetic is not None else None
    if source is None and evaluator is None:
        return
    for sampler in eval_samplers(args.sampler, loaded.config.arch):
        generator = torch.Generator(args.device).manual_seed(args.seed)
        q, _ = sample_quality(loaded.model, args.samples, args.steps, generator, loaded.tokenizer.decode,
                              evaluator, sampler, args.gen_ppl_protocol, source)
        scores = []
        if source is not None:
            scores.append(f"exact NLL under the source {q['nll']:.4f} nats/symbol (95% CI {q['nll_low']:.4f}-"
                          f"{q['nll_high']:.4f}), source entropy {q['source_entropy']:.4f} (gap {q['nll_gap']:+.4f})")
        if evaluator is not None:
            scores.append(f"generative perplexity {q['gen_ppl']:.4f} under {args.eval_model} "
                          f"({args.gen_ppl_protocol}-window protocol)")
        own = f" (the source's {q['source_unigram_entropy']:.4f})" if source is not None else ""
        invalid = f"; {q['invalid']} special ids among the symbols" if source is not None else ""
        print(f"{args.samples} samples in {args.steps} steps, {sampler} sampler "
              f"({q['sampling_tokens_per_s']:,.0f} tokens/s): {', '.join(scores)}, "
              f"unigram entropy {q['entropy']:.4f} nats{own}{invalid}")


if __name__ == "__main__":
    sys.exit(main())
