"""Image shard builder: class-labelled token grids ``[BOS, c_0 .. c_{H*W-1}]`` (row-major) -> tars.

Two sources:

- ``digits``: scikit-learn's ``load_digits`` (1,797 pictures of 8x8 pixels, 10 classes,
  shipped with the package): each pixel's grey level 0..16 is its token, so the codebook
  is 17 and BOS is 17 (vocabulary 18, sequences of 65).
- ``vq``: an ImageFolder (one sub-folder per class, class index = position in the sorted
  folder names) whose pictures are centre-cropped to a square, resized to ``image_size``
  and tokenized by a VQ model (:mod:`pgm_dist.images.vq`); its weights are copied into the
  folder as ``vq.safetensors`` so the codes can be decoded from the folder alone.

Split: picture ``i`` (in the source's order: ``load_digits`` order, or class folders then file
names, both sorted) is held out for validation when ``i % 10 == 0``. Train pictures are
written in a seeded random order (so every shard mixes the classes); every train shard
holds exactly ``samples_per_shard`` pictures (the remainder is dropped and counted, as the
text builder does); the last validation shard may be smaller. ``meta.json`` is written
last, and a re-run with the same inputs and settings reuses the folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pgm_dist.common.cli import HelpFormatter, default_device
from pgm_dist.common.errors import DataError
from pgm_dist.common.files import file_sha256, write_json_atomic
from pgm_dist.data.builder import samples_per_shard_for
from pgm_dist.data.documents import files_fingerprint
from pgm_dist.data.shards import (
    BUILDER_VERSION,
    META_FILE,
    VQ_FILE,
    DatasetMeta,
    ShardWriter,
    SplitInfo,
    reuse_or_reset,
    token_dtype,
)
from pgm_dist.images.vq import VQConfig, VQModel, load_vq, save_vq

VAL_EVERY = 10  # picture i goes to validation when i % VAL_EVERY == 0
ORDER_SEED = 0
DIGITS_LEVELS = 17  # load_digits' grey levels 0..16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

Sample = tuple[str, np.ndarray, int]  # (key, tokens [1 + H*W], label)


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of ``n`` pictures: val is every ``VAL_EVERY``-th, from 0."""
    index = np.arange(n)
    return index[index % VAL_EVERY != 0], index[index % VAL_EVERY == 0]


def load_digits_grids() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: grey levels ``int64 [1797, 8, 8]`` in 0..16 and labels ``int64 [1797]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)


def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train grids, train labels), (val grids, val labels)) of the digits, split as the shards are."""
    grids, labels = load_digits_grids()
    train, val = split_indices(len(grids))
    return (grids[train], labels[train]), (grids[val], labels[val])


def grid_sequence(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Codes ``[H, W]`` -> the model's sequence ``[1 + H*W]``: BOS (= ``codebook_size``) then row-major codes."""
    return np.concatenate([[codebook_size], codes.reshape(-1)]).astype(token_dtype(codebook_size + 1))


@dataclass(frozen=True)
class ImageFolderListing:
    files: list[Path]
    labels: list[int]
    class_names: list[str]


def list_image_folder(root: Path) -> ImageFolderListing:
    """Pictures under ``root/<class>/`` (any depth), sorted; files of other types are left out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders: lay it out as {root}/<class name>/<picture>")
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        pictures = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not pictures:
            raise DataError(f"class folder {folder} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        files += pictures
        labels += [label] * len(pictures)
    return ImageFolderListing(files, labels, [p.name for p in class_dirs])


def load_picture(path: Path, size: int) -> torch.Tensor:
    """A picture as ``float32 [3, size, size]`` in [-1, 1], prepared as the reference's ImageNet
    pipeline (torchvision ``Resize(size)`` then ``CenterCrop(size)``): the short side resized to
    ``size`` (bilinear, antialiased as PIL does), the long side to ``int(size * long / short)``, then
    the central square, its offset rounded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path} is not a readable picture ({err})") from None
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


# The pictures' preparation, part of the folder's identity: a folder built by another is rebuilt.
PREPROCESSING = "resize-short-bilinear+center-crop"


@dataclass(frozen=True)
class ImageSource:
    """What the builder needs of a source: how many pictures, and their samples in a given order."""

    name: str  # "digits" | "vq"
    count: int
    labels: list[int]
    class_names: list[str]
    grid: tuple[int, int]
    codebook_size: int
    samples: Callable[[np.ndarray], Iterator[Sample]]  # picture indices -> their samples, in that order
    sources: list[dict]
    identity: list  # what the output depends on (for the reuse check)
    vq_model: "VQModel | None" = None  # saved into the folder, its config into meta.json
    val_from: int | None = None  # pictures from this index on are the validation split (--val-input)


def digits_source() -> ImageSource:
    grids, labels = load_digits_grids()

    def samples(indices: np.ndarray) -> Iterator[Sample]:
        for i in indices:
            yield f"{i:09d}", grid_sequence(grids[i], DIGITS_LEVELS), int(labels[i])

    content = hashlib.sha256(grids.tobytes() + labels.tobytes()).hexdigest()
    return ImageSource("digits", len(grids), labels.tolist(), [str(c) for c in range(10)], (8, 8), DIGITS_LEVELS,
                       samples, [{"path": "sklearn.datasets.load_digits", "files": len(grids), "sha256": content}],
                       identity=[content])


def vq_source(input_dir: Path, vq_path: Path, vq_config: "VQConfig | None", image_size: int, batch_size: int,
              device: str, progress: Callable[[int], None], val_dir: Path | None = None) -> ImageSource:
    """An ImageFolder tokenized by the VQ model at ``vq_path``; pictures are read and encoded
    lazily, ``batch_size`` at a time, when the samples are written. ``val_dir``: a second ImageFolder
    with the same class sub-folders (ImageNet-val) that is the validation split."""

    listing = list_image_folder(input_dir)
    sources = [{"path": str(input_dir), "files": len(listing.files), "sha256": files_fingerprint(listing.files)}]
    val_from = None
    if val_dir is not None:
        val = list_image_folder(val_dir)
        if val.class_names != listing.class_names:
            missing = sorted(set(listing.class_names) ^ set(val.class_names))[:5]
            raise DataError(f"--val-input {val_dir} does not have the class sub-folders of {input_dir} "
                            f"(e.g. {', '.join(missing)} in only one of them)")
        val_from = len(listing.files)
        sources.append({"path": str(val_dir), "split": "val", "files": len(val.files),
                        "sha256": files_fingerprint(val.files)})
        listing = ImageFolderListing(listing.files + val.files, listing.labels + val.labels, listing.class_names)
    if batch_size < 1 or image_size < 1:
        raise DataError("--batch-size and --image-size must be at least 1")
    model = load_vq(vq_path, vq_config).to(device)
    f = model.config.downsample
    if image_size % f:
        raise DataError(f"--image-size {image_size} is not a multiple of the VQ model's downsampling factor {f}")
    codebook = model.config.codebook_size

    def samples(indices: np.ndarray) -> Iterator[Sample]:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            pictures = torch.stack([load_picture(listing.files[i], image_size) for i in batch]).to(device)
            codes = model.encode(pictures).cpu().numpy()
            for i, grid in zip(batch, codes):
                yield f"{i:09d}", grid_sequence(grid, codebook), listing.labels[i]
            progress(len(batch))

    weights = file_sha256(vq_path)
    return ImageSource(
        "vq", len(listing.files), listing.labels, listing.class_names, (image_size // f, image_size // f), codebook,
        samples, [*sources, {"path": str(vq_path), "files": 1, "sha256": weights}],
        identity=[files_fingerprint(listing.files), weights, image_size, PREPROCESSING, val_from], vq_model=model,
        val_from=val_from)


def write_split(out: Path, split: str, samples: Iterable[Sample], per_shard: int, keep_partial: bool,
                ) -> tuple[SplitInfo, int]:
    """One split's pictures through the one shard writer; returns (info, dropped). Each picture is a document."""
    writer = ShardWriter(out, split, per_shard)
    for sample in samples:
        writer.add(sample)
    dropped = writer.close(keep_partial)
    writer.info.documents = writer.info.samples
    return writer.info, dropped


def build_images(out: Path, source: ImageSource, samples_per_shard: int | None = None, *, log=print) -> DatasetMeta:
    """Write (or reuse) an image data folder from ``source``; returns its metadata."""
    out = Path(out)
    fingerprint = hashlib.sha256(json.dumps([BUILDER_VERSION, source.name, source.identity, samples_per_shard,
                                             VAL_EVERY, ORDER_SEED], sort_keys=True).encode()).hexdigest()
    if source.val_from is not None:  # a separate validation folder: nothing held out of the train one
        train, val = np.arange(source.val_from), np.arange(source.val_from, source.count)
    else:
        train, val = split_indices(source.count)
    if len(train) == 0:
        raise DataError(f"{source.count} picture(s): not one for training (every {VAL_EVERY}th, from the first, "
                        "is held out for validation)")
    reused = reuse_or_reset(out, fingerprint, log)
    if reused is not None:
        return reused
    if source.vq_model is not None:
        save_vq(source.vq_model, out / VQ_FILE)

    per_shard, reason = samples_per_shard_for(len(train), samples_per_shard, "pictures")
    order = train[np.random.default_rng(ORDER_SEED).permutation(len(train))]
    train_info, dropped = write_split(out, "train", source.samples(order), per_shard, keep_partial=False)
    val_info, _ = write_split(out, "val", source.samples(val), per_shard, keep_partial=True)
    if train_info.shards == 0:
        raise DataError(f"{len(train)} train pictures: fewer than one shard of {per_shard}; "
                        "lower --samples-per-shard")
    h, w = source.grid
    vocab = source.codebook_size + 1
    meta = DatasetMeta(
        vocab_size=vocab, seq_len=1 + h * w, special_ids={"bos": source.codebook_size},
        dtype=token_dtype(vocab).name, samples_per_shard=per_shard, samples_per_shard_reason=reason,
        train=train_info, val=val_info, dropped_blocks=dropped, sources=source.sources,
        settings_fingerprint=fingerprint,
        image={"grid": [h, w], "codebook_size": source.codebook_size, "num_classes": len(source.class_names),
               "class_names": source.class_names, "source": source.name,
               "vq": source.vq_model.config.to_dict() if source.vq_model is not None else None},
    )
    write_json_atomic(out / META_FILE, meta.to_dict())
    log(f"wrote {train_info.shards} train shards of {per_shard} pictures and {val_info.shards} val shards "
        f"({val_info.samples} pictures) of {h}x{w} grids to {out}; {dropped} trailing train pictures dropped")
    return meta


def build_digits(out: Path, samples_per_shard: int | None = None, log=print) -> DatasetMeta:
    return build_images(out, digits_source(), samples_per_shard, log=log)


def build_vq(out: Path, input_dir: Path, vq_path: Path, vq_config: "VQConfig | None" = None, image_size: int = 256,
             batch_size: int = 32, device: str = "cpu", samples_per_shard: int | None = None,
             progress: bool = True, log=print, val_dir: Path | None = None) -> DatasetMeta:
    """Tokenize an ImageFolder with a VQ checkpoint into an image data folder (``val_dir``: the
    validation split's own folder; else every tenth picture is held out)."""
    bar = tqdm(unit="img", desc="encode", disable=not progress)
    try:
        source = vq_source(Path(input_dir), Path(vq_path), vq_config, image_size, batch_size, device, bar.update,
                           Path(val_dir) if val_dir is not None else None)
        bar.reset(total=source.count)
        return build_images(out, source, samples_per_shard, log=log)
    finally:
        bar.close()


def vq_config(text: str | None) -> "VQConfig | None":
    """``--vq-config``: a JSON object of VQ config fields (or a .json file of one) over the VQ-16 defaults,
    instead of the config the checkpoint's shapes give (None)."""

    if text is None:
        return None
    if Path(text).is_file():
        text = Path(text).read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--vq-config is neither a JSON object nor a JSON file ({err.msg})") from None
    if not isinstance(values, dict):
        raise ValueError("--vq-config must be a JSON object of VQ config fields, e.g. '{\"codebook_size\": 8192}'")
    return VQConfig.from_dict(values)


def add_build_images_parser(commands) -> None:
    """The ``build-images`` subcommand of ``python -m pgm_dist.data``."""
    i = commands.add_parser("build-images", help="class-labelled token grids: the digits demo, or an image folder "
                            "through a VQ tokenizer", description="Build image shards.", formatter_class=HelpFormatter)
    i.add_argument("--out", type=Path, required=True, help="output folder (e.g. data_shards/digits)")
    source = i.add_mutually_exclusive_group(required=True)
    source.add_argument("--digits", action="store_true",
                        help="scikit-learn's 8x8 digits (no download): grey level 0..16 = token")
    source.add_argument("--vq", type=Path, help="VQ tokenizer checkpoint (LlamaGen {'model': state_dict}, a bare "
                        "state dict, or a .safetensors written by this project)")
    i.add_argument("--input", type=Path, help="with --vq: an image folder, one sub-folder per class")
    i.add_argument("--val-input", type=Path, default=None,
                   help="with --vq: the validation split's own image folder, the same class sub-folders (ImageNet-"
                        "val); then nothing is held out of --input")
    i.add_argument("--vq-config", default=None,
                   help="with --vq: JSON object (or .json file) of VQ config fields over LlamaGen's VQ-16 defaults, "
                        "instead of the config read from the checkpoint's shapes")
    i.add_argument("--image-size", type=int, default=256,
                   help="with --vq: pixels per side (short side resized to it, then the centre square)")
    i.add_argument("--batch-size", type=int, default=32, help="with --vq: pictures per encoder batch")
    i.add_argument("--device", default=None, help="with --vq: encoder device (default: cuda when present, else cpu)")
    i.add_argument("--samples-per-shard", type=int, default=None,
                   help="pictures per shard (default: the text builder's rule)")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_images_command(args: argparse.Namespace) -> None:
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    if args.digits:
        if args.input is not None or args.vq_config is not None or args.val_input is not None:
            raise ValueError("--input, --val-input and --vq-config go with --vq, not --digits")
        build_digits(args.out, args.samples_per_shard)
        return
    if args.input is None:
        raise ValueError("--vq needs --input IMAGE_FOLDER (one sub-folder per class)")
    device = args.device or default_device()
    build_vq(args.out, args.input, args.vq, vq_config(args.vq_config), args.image_size, args.batch_size, device,
             args.samples_per_shard, progress=not args.no_progress, val_dir=args.val_input)
