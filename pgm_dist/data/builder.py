"""Shard builder: documents -> sentencepiece -> blocks ``[BOS] + (L-2) tokens + [EOS]`` -> tars.

Documents are joined with EOS and cut into blocks; a held-out validation split is
chosen per document (by a hash of its text, so duplicates never straddle splits).
Train shards all hold exactly ``samples_per_shard`` blocks (the remainder is dropped
and counted); the last validation shard may be smaller. An explicit ``samples_per_shard``
is honoured; without one (None) it is 1024, or less for a corpus that would fill fewer
than 64 train shards of 1024: then ``train blocks // 64``, so that a small corpus still
splits over 64 ranks x loader workers. ``meta.json`` is written last:
a folder without it is not finished, and a re-run with the same inputs and settings
finds it and reuses everything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pgm_dist.common.files import file_sha256, write_json_atomic
from pgm_dist.data.documents import (
    TEXT_FIELD,
    Document,
    HFDatasetInput,
    default_corpus_paths,
    files_fingerprint,
    iter_documents,
    list_files,
)
from pgm_dist.data.shards import (
    BUILDER_VERSION,
    META_FILE,
    TOKENIZER_FILE,
    DatasetMeta,
    ShardWriter,
    reuse_or_reset,
    token_dtype,
)
from pgm_dist.data.tokenizer import SPECIAL_IDS, Tokenizer, train_tokenizer, write_hf_tokenizer

TOKENIZER_STAMP = "tokenizer.stamp"
DOCS_PER_TASK = 64
TASKS_PER_ROUND = 64  # bounds the documents held in memory
DEFAULT_SAMPLES_PER_SHARD = 1024
AUTO_MIN_TRAIN_SHARDS = 64  # what the automatic shard size aims for (ranks x loader workers a corpus feeds)


def samples_per_shard_for(n_train: int, requested: int | None, unit: str = "samples") -> tuple[int, str]:
    """Every builder's shard size and why: the request, else the default, else ``n_train // 64``
    for a set too small to fill 64 default shards (so that it still splits over ranks x workers)."""
    if requested:
        return requested, "--samples-per-shard"
    if n_train >= AUTO_MIN_TRAIN_SHARDS * DEFAULT_SAMPLES_PER_SHARD:
        return DEFAULT_SAMPLES_PER_SHARD, "default"
    return max(1, n_train // AUTO_MIN_TRAIN_SHARDS), (
        f"automatic: {n_train} train {unit}, fewer than {AUTO_MIN_TRAIN_SHARDS} shards of {DEFAULT_SAMPLES_PER_SHARD}")


@dataclass
class BuildSettings:
    vocab_size: int = 8192
    seq_len: int = 256
    val_fraction: float = 0.01
    samples_per_shard: int | None = None  # None: automatic (see the module docstring)
    tokenizer: Path | None = None  # an existing tokenizer file (any kind Tokenizer reads) instead of training one
    hf_tokenizer: str | None = None  # a Hugging Face tokenizer (name, folder or tokenizer.json) instead
    workers: int = 2
    model_type: str = "bpe"
    text_field: str = TEXT_FIELD  # the text of a .jsonl line / .parquet row / dataset record
    hf_dataset: HFDatasetInput | None = None  # a Hugging Face dataset instead of --input files

    def __post_init__(self) -> None:
        if self.seq_len < 3:
            raise ValueError(f"--seq-len must be at least 3 (BOS + a token + EOS), got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if (self.samples_per_shard is not None and self.samples_per_shard < 1) or self.workers < 1:
            raise ValueError("--samples-per-shard and --workers must be at least 1")
        if isinstance(self.hf_dataset, dict):
            self.hf_dataset = HFDatasetInput(**self.hf_dataset)
        if self.tokenizer is not None and self.hf_tokenizer is not None:
            raise ValueError("pass --tokenizer or --hf-tokenizer, not both")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer {self.tokenizer} does not exist")


def is_validation(doc: Document, fraction: float) -> bool:
    digest = hashlib.sha256(doc.text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _sources_checksums(inputs: list[Path], files: list[Path]) -> list[dict]:
    out = []
    for root in inputs:
        h, count = hashlib.sha256(), 0
        for path in files:
            if path == root or root in path.parents:
                h.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
                h.update(path.read_bytes())
                count += 1
        out.append({"path": str(root), "files": count, "sha256": h.hexdigest()})
    return out


class BlockPacker:
    """Joins documents with EOS and cuts ``[BOS] + body + [EOS]`` blocks of ``seq_len``."""

    def __init__(self, seq_len: int, bos: int, eos: int, dtype: np.dtype):
        self.body, self.bos, self.eos, self.dtype = seq_len - 2, bos, eos, dtype
        self.pending: list[np.ndarray] = []
        self.pending_len = 0

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        self.pending.append(np.append(ids, self.eos).astype(self.dtype))
        self.pending_len += len(ids) + 1
        if self.pending_len < self.body:
            return
        stream = np.concatenate(self.pending)
        n_blocks = len(stream) // self.body
        for i in range(n_blocks):
            chunk = stream[i * self.body:(i + 1) * self.body]
            yield np.concatenate([[self.bos], chunk, [self.eos]]).astype(self.dtype)
        rest = stream[n_blocks * self.body:]
        self.pending, self.pending_len = [rest], len(rest)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


def _batched(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_in_order(docs: Iterator[Document], pool, tokenizer_path: str):
    """(documents, their ids) in input order, a bounded number of tasks in flight."""
    if pool is None:
        _init_worker(tokenizer_path)
    for tasks in _batched(_batched(docs, DOCS_PER_TASK), TASKS_PER_ROUND):
        texts = [[d.text for d in task] for task in tasks]
        results = pool.map(_encode, texts) if pool is not None else [_encode(t) for t in texts]
        yield from zip(tasks, results)


def _prepare_tokenizer(out: Path, documents, settings: BuildSettings, fingerprint: str, log) -> Tokenizer:
    target = out / TOKENIZER_FILE
    stamp = out / TOKENIZER_STAMP
    if settings.tokenizer is not None:
        if not target.exists() or file_sha256(target) != file_sha256(settings.tokenizer):
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(settings.tokenizer, tmp)
            tmp.replace(target)
        return Tokenizer(target)
    if target.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        log(f"reusing the tokenizer in {target}")
        return Tokenizer(target)
    log(f"training a {settings.vocab_size}-token sentencepiece {settings.model_type} model ...")
    tokenizer = train_tokenizer((d.text for d in documents()), target,
                                settings.vocab_size, settings.model_type, threads=settings.workers)
    stamp.write_text(fingerprint + "\n")
    return tokenizer


def build(out: Path, inputs: list[Path] | None = None, settings: BuildSettings | None = None,
          progress: bool = True, log=print) -> DatasetMeta:
    """Build (or reuse) a data folder; returns its metadata."""
    settings = settings or BuildSettings()
    out = Path(out)
    if settings.hf_tokenizer is not None:
        # resolved once, into a file: from here on it is "an existing tokenizer", fingerprinted by content
        with tempfile.TemporaryDirectory() as tmp:
            resolved = write_hf_tokenizer(Path(tmp) / TOKENIZER_FILE, settings.hf_tokenizer)
            log(f"Hugging Face tokenizer {settings.hf_tokenizer}: {resolved.vocab_size} tokens, BOS {resolved.bos_id}, "
                f"EOS {resolved.eos_id}")
            return build(out, inputs, dataclasses.replace(settings, tokenizer=resolved.path, hf_tokenizer=None),
                         progress, log)
    if settings.hf_dataset is not None and inputs:
        raise ValueError("pass --input or --hf-dataset, not both")
    source = settings.hf_dataset
    inputs = [] if source else [Path(p) for p in inputs] if inputs else default_corpus_paths()
    files = [] if source else list_files(inputs)
    inputs_fingerprint = source.fingerprint() if source else files_fingerprint(files)

    def documents() -> Iterator[Document]:
        return source.documents(settings.text_field) if source else iter_documents(files, settings.text_field)

    settings_dict = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    settings_dict.pop("workers")  # the output does not depend on it
    # options added later leave the fingerprints of folders built without them as they were
    added_defaults = {"hf_tokenizer": None, "text_field": TEXT_FIELD, "hf_dataset": None}
    for name, default in added_defaults.items():
        if settings_dict[name] == default:
            settings_dict.pop(name)
    if settings.tokenizer is not None:
        settings_dict["tokenizer"] = file_sha256(settings.tokenizer)
    fingerprint = hashlib.sha256(json.dumps(
        [BUILDER_VERSION, settings_dict, inputs_fingerprint], sort_keys=True).encode()).hexdigest()
    trained_on = [BUILDER_VERSION, settings.vocab_size, settings.model_type, inputs_fingerprint]
    if settings.text_field != TEXT_FIELD:
        trained_on.append(settings.text_field)
    tokenizer_fingerprint = hashlib.sha256(json.dumps(trained_on).encode()).hexdigest()

    reused = reuse_or_reset(out, fingerprint, log)
    if reused is not None:
        return reused

    tokenizer = _prepare_tokenizer(out, documents, settings, tokenizer_fingerprint, log)
    dtype = token_dtype(tokenizer.vocab_size)
    packers = {s: BlockPacker(settings.seq_len, tokenizer.bos_id, tokenizer.eos_id, dtype) for s in ("train", "val")}
    sinks = {s: ShardWriter(out, s, settings.samples_per_shard) for s in ("train", "val")}
    # Automatic size: hold the blocks until the corpus proves big enough for the default size
    # (at most AUTO_MIN_TRAIN_SHARDS default shards in memory) or ends (then a smaller size).
    auto_until = None if settings.samples_per_shard else AUTO_MIN_TRAIN_SHARDS * DEFAULT_SAMPLES_PER_SHARD

    pool = mp.get_context("spawn").Pool(settings.workers, _init_worker, (str(tokenizer.path),)) \
        if settings.workers > 1 else None
    bar = tqdm(unit="doc", desc="tokenize", disable=not progress)
    try:
        for docs, ids_list in _encode_in_order(documents(), pool, str(tokenizer.path)):
            for doc, ids in zip(docs, ids_list):
                split = "val" if is_validation(doc, settings.val_fraction) else "train"
                sinks[split].info.documents += 1
                for block in packers[split].add(np.asarray(ids, dtype=np.int64)):
                    sinks[split].add(block)
                if auto_until is not None and len(sinks["train"].pending) >= auto_until:
                    auto_until = None
                    for sink in sinks.values():
                        sink.set_shard_size(DEFAULT_SAMPLES_PER_SHARD)
            bar.update(len(docs))
            bar.set_postfix(train_shards=sinks["train"].info.shards, val_shards=sinks["val"].info.shards)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    train_blocks = sinks["train"].info.samples + len(sinks["train"].pending)
    per_shard, reason = samples_per_shard_for(train_blocks, settings.samples_per_shard, "blocks")
    if reason.startswith("automatic"):
        log(f"{reason}; writing shards of {per_shard} blocks instead")
        for sink in sinks.values():
            sink.set_shard_size(per_shard)
    dropped = sinks["train"].close(keep_partial=False) + sinks["val"].close(keep_partial=True)
    if sinks["train"].info.shards == 0:
        raise ValueError(f"the inputs give fewer than {per_shard} blocks of {settings.seq_len} "
                         "tokens: not one train shard; lower --samples-per-shard or --seq-len")

    meta = DatasetMeta(
        vocab_size=tokenizer.vocab_size, seq_len=settings.seq_len, dtype=dtype.name,
        special_ids={"unk": None if tokenizer.kind == "hf" else SPECIAL_IDS["unk"], "bos": tokenizer.bos_id,
                     "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        samples_per_shard=per_shard, samples_per_shard_reason=reason, train=sinks["train"].info,
        val=sinks["val"].info,
        dropped_blocks=dropped, tokenizer_sha256=tokenizer.sha256,
        sources=[{"hf_dataset": dataclasses.asdict(source)}] if source else _sources_checksums(inputs, files),
        settings_fingerprint=fingerprint,
    )
    write_json_atomic(out / META_FILE, meta.to_dict())
    log(f"wrote {meta.train.shards} train shards of {per_shard} blocks ({meta.train.tokens:,} tokens) and "
        f"{meta.val.shards} val shards ({meta.val.tokens:,} tokens) to {out}; {dropped} trailing blocks dropped")
    return meta
