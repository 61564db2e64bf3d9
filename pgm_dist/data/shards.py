"""The shard format: WebDataset tars of ``{__key__, tokens.npy}`` samples plus ``meta.json``.

Image shards add ``label.npy`` (an int64 scalar, the class) to every sample. Tokens are
stored as ``.npy`` (uint16 when the vocabulary fits, else int32) and every member is
read with ``allow_pickle=False``; no pickle-based member is ever decoded.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from braceexpand import braceexpand

from pgm_dist.common.errors import DataError

BUILDER_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
VQ_FILE = "vq.safetensors"  # an image folder's VQ tokenizer weights (its config is in meta.json)
SAMPLE_SUFFIX = ".tokens.npy"
LABEL_SUFFIX = ".label.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray] | tuple[str, np.ndarray, int]]) -> int:
    """Write a tar shard atomically (``.tmp`` then rename): a half-written shard never
    carries the final name. Samples are ``(key, tokens)``, or ``(key, tokens, label)`` for
    images. Returns the number of samples written."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as writer:
        for key, tokens, *label in samples:
            sample = {"__key__": key, "tokens.npy": _npy_bytes(tokens)}
            if label:
                sample["label.npy"] = _npy_bytes(np.asarray(label[0], dtype=np.int64))
            writer.write(sample)
            count += 1
    os.replace(tmp, path)
    return count


def _sample(key: str, fields: dict[str, np.ndarray], labels: bool) -> tuple:
    if SAMPLE_SUFFIX not in fields:
        raise ValueError(f"sample {key} has no tokens.npy")
    if not labels:
        return key, fields[SAMPLE_SUFFIX]
    label = fields.get(LABEL_SUFFIX)
    if label is None or label.shape != () or label.dtype.kind not in "iu":
        raise ValueError(f"sample {key} has no integer label.npy scalar: not an image shard")
    return key, fields[SAMPLE_SUFFIX], int(label)


def iter_shard(url: str, *, labels: bool = False) -> Iterator[tuple[str, np.ndarray] | tuple[str, np.ndarray, int]]:
    """(key, tokens) of every sample of one shard: a local path, ``pipe:`` command or URL;
    ``(key, tokens, label)`` with ``labels`` (image shards).

    Raises ``tarfile.TarError``, ``EOFError`` or ``ValueError`` on a corrupt shard.
    """
    wanted = (SAMPLE_SUFFIX, LABEL_SUFFIX) if labels else (SAMPLE_SUFFIX,)
    key, fields = None, {}
    with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            suffix = next((s for s in wanted if member.name.endswith(s)), None)
            if not member.isfile() or suffix is None:
                continue  # other members (never pickles) are not ours to decode
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"truncated member {member.name}")
            # A sample's members are adjacent in a WebDataset tar: a new key ends the last sample.
            member_key = member.name[: -len(suffix)]
            if member_key != key:
                if key is not None:
                    yield _sample(key, fields, labels)
                key, fields = member_key, {}
            fields[suffix] = np.load(io.BytesIO(data), allow_pickle=False)
    if key is not None:
        yield _sample(key, fields, labels)


def expand_sources(sources: str | list[str]) -> list[str]:
    """Shard URLs from paths, glob or brace patterns (``train-{000000..000099}.tar``),
    ``pipe:`` commands and http(s) URLs. Local shards must exist."""
    if isinstance(sources, str):
        sources = [sources]
    urls: list[str] = []
    for source in sources:
        for item in braceexpand(source):
            if item.startswith(("pipe:", "http://", "https://")):
                urls.append(item)
            elif any(ch in item for ch in "*?["):
                urls.extend(sorted(glob.glob(item)))
            elif Path(item).is_file():
                urls.append(item)
            else:
                raise DataError(f"shard {item} does not exist")
    if not urls:
        raise DataError(f"no shard matches {', '.join(sources)}: build shards with `python -m pgm_dist.data build`")
    return urls


@dataclass
class SplitInfo:
    shards: int = 0
    samples: int = 0
    tokens: int = 0
    documents: int = 0


@dataclass
class DatasetMeta:
    """Everything a run must know about a data folder; written last by the builder."""

    vocab_size: int
    seq_len: int
    special_ids: dict
    dtype: str
    samples_per_shard: int
    samples_per_shard_reason: str = ""  # "--samples-per-shard", "default" or "automatic: ..." (the builder's rule)
    train: SplitInfo = field(default_factory=SplitInfo)
    val: SplitInfo = field(default_factory=SplitInfo)
    dropped_blocks: int = 0
    tokenizer_sha256: str = ""
    sources: list = field(default_factory=list)
    settings_fingerprint: str = ""
    builder_version: int = BUILDER_VERSION
    # Image folders only: {"grid": [H, W], "codebook_size": K, "num_classes": C, "class_names": [...],
    # "source": "digits" | "vq", "vq": VQConfig fields | None}; tokens are [BOS=K, row-major grid].
    image: dict | None = None
    # Synthetic folders only (pgm_dist.data.synthetic): the source's settings and its entropy per symbol.
    synthetic: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetMeta":
        values = dict(values)
        values["train"] = SplitInfo(**values.get("train", {}))
        values["val"] = SplitInfo(**values.get("val", {}))
        return cls(**values)

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> "DatasetMeta":
        path = Path(data_dir) / META_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: {data_dir} is not a finished data folder "
                            "(build one with `python -m pgm_dist.data build --out DIR`)")
        return cls.from_dict(json.loads(path.read_text()))

    def check(self, *, seq_len: int | None = None, vocab_size: int | None = None) -> None:
        """Refuse shards whose sequence length or vocabulary differ from the run's."""
        if seq_len is not None and seq_len != self.seq_len:
            raise DataError(f"the shards hold sequences of length {self.seq_len} but the run expects {seq_len}: "
                            f"rebuild the data with --seq-len {seq_len} or run with the shards' length")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise DataError(f"the shards were tokenized with a {self.vocab_size}-token vocabulary but the run "
                            f"expects {vocab_size}: use the tokenizer the shards were built with")


def reuse_or_reset(out: Path, fingerprint: str, log=print) -> DatasetMeta | None:
    """A builder's start: the finished folder's metadata when it was built with ``fingerprint``,
    else None after emptying ``out`` of meta.json (the folder is unfinished from here on), shards
    and a VQ file, so that nothing of an older build survives beside the new one."""
    if (out / META_FILE).is_file():
        meta = DatasetMeta.load(out)
        if meta.settings_fingerprint == fingerprint:
            log(f"{out} is up to date ({meta.train.shards} train / {meta.val.shards} val shards); reusing it")
            return meta
        log(f"{out} was built from other inputs or settings; rebuilding it")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for old in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")) + list(out.glob("*.tar.tmp")):
        old.unlink()
    (out / VQ_FILE).unlink(missing_ok=True)
    return None


@dataclass
class DataFolder:
    """A finished data folder: ``meta.json``, train and val shards, and ``tokenizer.model``
    (text) or, for VQ image tokens, ``vq.safetensors``."""

    path: Path
    meta: DatasetMeta

    @classmethod
    def open(cls, path: str | os.PathLike, *, seq_len: int | None = None,
             vocab_size: int | None = None) -> "DataFolder":
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist: build it with "
                            f"`python -m pgm_dist.data build --out {path}`")
        folder = cls(path, DatasetMeta.load(path))
        decoder = folder.vq_path if folder.is_image else folder.tokenizer_path
        if decoder is not None and not decoder.is_file():
            raise DataError(f"{decoder} is missing: the shards cannot be decoded without the "
                            "tokenizer they were built with; rebuild the folder")
        folder.meta.check(seq_len=seq_len, vocab_size=vocab_size)
        return folder

    @property
    def is_image(self) -> bool:
        """Image shards: the loaders yield ``(tokens, labels)`` (pass them ``labels=True``)."""
        return self.meta.image is not None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def vq_path(self) -> Path | None:
        """The VQ weights of a VQ image folder; None for digits (grey levels need no decoder)."""
        return self.path / VQ_FILE if self.is_image and self.meta.image.get("vq") is not None else None

    @property
    def train_sources(self) -> str:
        return str(self.path / "train-*.tar")

    @property
    def val_sources(self) -> str:
        return str(self.path / "val-*.tar")


class ShardWriter:
    """The one shard writer of every builder: collects the samples of one split and writes
    ``{split}-{index:06d}.tar`` shards of ``per_shard`` samples; with ``per_shard=None`` it holds
    every sample until :meth:`set_shard_size`. A sample is a token array (keyed
    ``{split}-{n:09d}`` by its index in the split) or ``(key, tokens[, label])``."""

    def __init__(self, out: Path, split: str, per_shard: int | None):
        self.out, self.split, self.per_shard = out, split, per_shard
        self.pending: list[tuple] = []
        self.info = SplitInfo()

    def add(self, sample) -> None:
        if not isinstance(sample, tuple):
            sample = (f"{self.split}-{self.info.samples + len(self.pending):09d}", sample)
        self.pending.append(sample)
        if len(self.pending) == self.per_shard:
            self._flush(self.per_shard)

    def set_shard_size(self, per_shard: int) -> None:
        self.per_shard = per_shard
        while len(self.pending) >= per_shard:
            self._flush(per_shard)

    def _flush(self, count: int) -> None:
        """Write the first ``count`` held samples as the next shard."""
        samples, self.pending = self.pending[:count], self.pending[count:]
        write_shard(self.out / f"{self.split}-{self.info.shards:06d}.tar", samples)
        self.info.shards += 1
        self.info.samples += len(samples)
        self.info.tokens += sum(len(sample[1]) for sample in samples)

    def close(self, keep_partial: bool) -> int:
        """Write or drop the last incomplete shard; returns the number of dropped samples."""
        dropped = 0
        if self.pending and keep_partial:
            self._flush(len(self.pending))
        else:
            dropped = len(self.pending)
        self.pending = []
        return dropped
