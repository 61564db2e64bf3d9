"""Streaming loaders over token shards, for any number of ranks and DataLoader workers.

Training stream, per rank (one composed pipeline)::

    shard list -> shuffle per epoch (seed, epoch) -> split by node -> split by worker
      -> samples -> shuffle buffer (``shuffle_shards`` shards mixed together) -> [micro_batch, L]

The stream is infinite (training runs a fixed number of steps, so no rank ever waits
on another at an epoch end). Each worker's stream is a pure function of
(seed, epoch, rank, worker, window): its position is three integers, so
``state_dict()`` is tiny and a resumed stream continues exactly where it stopped,
reading only the current window again. Batches come from the workers in turn
(DataLoader keeps that order); after ``k`` batches a resumed loader rotates the
workers so that batch ``k + 1`` comes from the right one. At another world size,
worker count or shard count, exact continuation is impossible: the stream starts
a fresh shuffle at the next epoch instead (nothing replayed).

With ``labels=True`` (image shards, ``DataFolder.is_image``) both loaders yield
``(tokens LongTensor[B, L], labels LongTensor[B])`` instead of the tokens alone; the order
of samples, and so the resume state, is the same either way.
"""
from __future__ import annotations

import signal
import tarfile
import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pgm_dist.common.errors import DataError
from pgm_dist.data.shards import expand_sources, iter_shard

Position = tuple[int, int, int]  # (epoch, window, samples consumed in the window)
Sample = tuple[np.ndarray, int | None]  # (tokens [L], class label or None for text)
CORRUPT_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def ignore_preemption_signals(_worker_id: int = 0) -> None:
    """DataLoader workers must outlive SIGUSR2/SIGTERM so the main process can checkpoint."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def read_samples(url: str, seq_len: int, expected: int | None = None, labels: bool = False) -> list[Sample]:
    """All samples of one shard; raises on a corrupt shard, a sample of another length,
    a missing label (with ``labels``), or (with ``expected``) another sample count: a tar
    cut at a member boundary reads as a shorter, valid tar, and only the count gives it away."""
    samples = []
    for key, tokens, *label in iter_shard(url, labels=labels):
        if tokens.shape != (seq_len,):
            raise ValueError(f"sample {key} has shape {tokens.shape}, expected ({seq_len},)")
        samples.append((tokens, label[0] if label else None))
    if expected is not None and len(samples) != expected:
        raise ValueError(f"{len(samples)} samples where every shard holds {expected} (truncated?)")
    return samples


def read_or_skip(url: str, seq_len: int, skipped: set[str], expected: int | None = None,
                 labels: bool = False) -> list[Sample]:
    try:
        return read_samples(url, seq_len, expected, labels)
    except CORRUPT_SHARD_ERRORS as err:
        if url not in skipped:
            warnings.warn(f"skipping unreadable shard {url}: {type(err).__name__}: {err}", stacklevel=2)
            skipped.add(url)
        return []


def _to_batch(samples: list[Sample], labels: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([t for t, _ in samples]).astype(np.int64))
    return (tokens, torch.tensor([c for _, c in samples], dtype=torch.int64)) if labels else tokens


class _ShardStream(IterableDataset):
    """What each DataLoader worker runs; see the module docstring."""

    def __init__(self, urls, seq_len, samples_per_shard, micro_batch, rank, world_size, num_workers, seed,
                 shuffle_shards, rotation, positions, labels):
        self.urls, self.seq_len, self.micro_batch, self.labels = urls, seq_len, micro_batch, labels
        self.samples_per_shard = samples_per_shard
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.rotation, self.positions = rotation, positions

    def worker_shards(self, epoch: int, worker: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        shuffled = [self.urls[i] for i in order]
        return shuffled[self.rank::self.world_size][worker::self.num_workers]

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        return self._stream(worker, self.positions[worker])

    def _stream(self, worker: int, position: Position):
        epoch, window, offset = position
        pending: list[Sample] = []
        skipped: set[str] = set()
        while True:
            shards = self.worker_shards(epoch, worker)
            windows = [shards[i:i + self.shuffle_shards] for i in range(0, len(shards), self.shuffle_shards)]
            seen = 0
            for w in range(window, len(windows)):
                samples = [s for url in windows[w]
                           for s in read_or_skip(url, self.seq_len, skipped, self.samples_per_shard, self.labels)]
                seen += len(samples)
                order = np.random.default_rng([self.seed, epoch, self.rank, worker, w]).permutation(len(samples))
                for j in range(offset, len(samples)):
                    pending.append(samples[order[j]])
                    if len(pending) == self.micro_batch:
                        yield _to_batch(pending, self.labels), {"worker": worker, "position": (epoch, w, j + 1),
                                                   "skipped": sorted(skipped)}
                        pending = []
                offset = 0
            if seen == 0 and window == 0:
                raise DataError(f"rank {self.rank} worker {worker}: no readable sample in {len(shards)} shards")
            epoch, window = epoch + 1, 0


class TrainLoader:
    """Infinite stream of ``LongTensor[micro_batch, seq_len]`` (with ``labels``: ``(tokens, labels
    LongTensor[micro_batch])``) for one rank, with exact resume."""

    def __init__(self, sources: str | list[str], *, seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, seed: int = 0, shuffle_shards: int = 4,
                 samples_per_shard: int | None = None, pin_memory: bool = False, labels: bool = False):
        """``samples_per_shard`` (from ``meta.json``) lets the stream detect a shard cut short."""
        self.urls = expand_sources(sources)
        self.samples_per_shard = samples_per_shard
        self.logical_workers = max(num_workers, 1)
        needed = world_size * self.logical_workers
        if len(self.urls) < needed:
            raise DataError(f"{len(self.urls)} shards for {world_size} ranks x {self.logical_workers} loader workers: "
                            f"at least {needed} are needed; rebuild with a smaller --samples-per-shard "
                            "or use fewer loader workers")
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_shards, self.pin_memory = seed, max(shuffle_shards, 1), pin_memory
        self.labels = labels
        self.batches = 0
        self.positions: list[Position] = [(0, 0, 0)] * self.logical_workers
        self.skipped: set[str] = set()

    @property
    def skipped_shards(self) -> int:
        return len(self.skipped)

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "workers": self.logical_workers, "shards": len(self.urls), "shuffle_shards": self.shuffle_shards,
                "micro_batch": self.micro_batch}

    def state_dict(self) -> dict:
        return {"layout": self._layout(), "batches": self.batches,
                "positions": [list(p) for p in self.positions], "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = set(state["skipped"])
        positions = [tuple(p) for p in state["positions"]]
        if state["layout"] == self._layout():
            self.batches, self.positions = state["batches"], positions
            return
        next_epoch = max(p[0] for p in positions) + 1
        warnings.warn(f"data layout changed ({state['layout']} -> {self._layout()}): exact continuation is "
                      f"impossible; starting a fresh shuffle at epoch {next_epoch}", stacklevel=2)
        self.batches, self.positions = 0, [(next_epoch, 0, 0)] * self.logical_workers

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        stream = _ShardStream(self.urls, self.seq_len, self.samples_per_shard, self.micro_batch, self.rank, self.world_size,
                              self.logical_workers, self.seed, self.shuffle_shards,
                              rotation=self.batches % self.logical_workers, positions=list(self.positions),
                              labels=self.labels)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=ignore_preemption_signals if self.num_workers else None,
                            pin_memory=self.pin_memory)
        for batch, info in loader:
            self.batches += 1
            self.positions[info["worker"]] = tuple(info["position"])
            self.skipped.update(info["skipped"])
            yield batch


class ValidationLoader:
    """Finite, deterministic validation batches; sample ``i`` of the split goes to rank ``i % world_size``.

    Every run sees the same batches; ranks never share a sample. The last batch of a
    rank may be smaller than ``micro_batch``. With ``labels``, batches are ``(tokens, labels)``.
    """

    def __init__(self, sources: str | list[str], *, seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None, labels: bool = False):
        self.urls = expand_sources(sources)
        self.seq_len, self.micro_batch, self.labels = seq_len, micro_batch, labels
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.skipped: set[str] = set()

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        pending, index, produced = [], 0, 0
        for url in self.urls:
            for sample in read_or_skip(url, self.seq_len, self.skipped, labels=self.labels):
                if index % self.world_size == self.rank:
                    pending.append(sample)
                index += 1
                if len(pending) == self.micro_batch:
                    if self.max_batches is not None and produced == self.max_batches:
                        return
                    yield _to_batch(pending, self.labels)
                    pending, produced = [], produced + 1
        if pending and (self.max_batches is None or produced < self.max_batches):
            yield _to_batch(pending, self.labels)
