"""A synthetic corpus whose likelihood is known: a random sparse Markov source.

``python -m pgm_dist.data build-synthetic --out DIR [--vocab V] [--order 1|2] [--successors S]
[--seq-len L] [--seed N]`` writes ordinary shards (BOS, then L - 1 symbols of one chain started
afresh) with the source's tables in ``DIR/source.npz`` and an id codec in ``DIR/tokenizer.model``
(symbols are ids: no re-tokenisation). Every state has ``S`` likely successors (Dirichlet weights)
and gives every symbol at least ``smoothing / V``, so any sample has a finite likelihood.

For a model trained on such a folder, :func:`exact_sample_quality` scores generated samples under
the source itself: the exact negative log-likelihood per token with a bootstrap interval, against
the source's own expected NLL at that length (the ideal, :meth:`MarkovSource.entropy_per_token`),
with no evaluator model. ``python -m pgm_dist.evaluate`` reports it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgm_dist.common.errors import DataError
from pgm_dist.common.files import file_sha256, write_json_atomic
from pgm_dist.data.builder import samples_per_shard_for
from pgm_dist.data.shards import (
    BUILDER_VERSION,
    META_FILE,
    TOKENIZER_FILE,
    DatasetMeta,
    ShardWriter,
    reuse_or_reset,
    token_dtype,
)
from pgm_dist.data.tokenizer import write_id_codec

SOURCE_FILE = "source.npz"


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of ``p`` [..., V]."""
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log(safe)).sum(-1)


@dataclass
class MarkovSource:
    """A Markov chain over symbols ``0 .. V-1`` of order 1 or 2.

    initial [V]: the first symbol; first [V, V] (order 2 only): the second given the first;
    transitions [V**order, V]: the next symbol given the last ``order`` (state ``a * V + b`` for
    the pair (a, b), a the older)."""

    initial: np.ndarray
    transitions: np.ndarray
    order: int
    first: np.ndarray | None = None
    _references: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def vocab(self) -> int:
        return self.initial.shape[0]

    @classmethod
    def random(cls, vocab: int = 64, order: int = 1, successors: int = 4, seed: int = 0,
               smoothing: float = 0.01) -> "MarkovSource":
        """Each row: ``(1 - smoothing)`` on ``successors`` random symbols with Dirichlet(1) weights, plus
        ``smoothing`` spread over all ``vocab`` symbols."""
        if order not in (1, 2):
            raise ValueError(f"--order must be 1 or 2, got {order}")
        if not 1 <= successors <= vocab:
            raise ValueError(f"--successors must be in [1, --vocab {vocab}], got {successors}")
        if vocab < 2:
            raise ValueError(f"--vocab must be >= 2, got {vocab}")
        rng = np.random.default_rng(seed)

        def sparse_rows(n: int) -> np.ndarray:
            rows = np.full((n, vocab), smoothing / vocab)
            for row in rows:
                chosen = rng.choice(vocab, size=successors, replace=False)
                row[chosen] += (1 - smoothing) * rng.dirichlet(np.ones(successors))
            return rows / rows.sum(-1, keepdims=True)

        initial = sparse_rows(1)[0]
        first = sparse_rows(vocab) if order == 2 else None
        return cls(initial, sparse_rows(vocab**order), order, first)

    # -- files ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        arrays = {"initial": self.initial, "transitions": self.transitions, "order": np.array(self.order)}
        if self.first is not None:
            arrays["first"] = self.first
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> "MarkovSource":
        if not Path(path).is_file():
            raise DataError(f"{path} not found: not a synthetic data folder (python -m pgm_dist.data build-synthetic)")
        with np.load(path) as data:
            return cls(data["initial"], data["transitions"], int(data["order"]),
                       data["first"] if "first" in data else None)

    # -- sampling and likelihood ---------------------------------------------------------
    def _state(self, seqs: np.ndarray, t: int) -> np.ndarray:
        """The state before position ``t`` (t >= order) of each row of ``seqs``."""
        return seqs[:, t - 1] if self.order == 1 else seqs[:, t - 2] * self.vocab + seqs[:, t - 1]

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` chains of ``length`` symbols: int64 [n, length]."""
        seqs = np.zeros((n, length), dtype=np.int64)

        def draw(p: np.ndarray) -> np.ndarray:  # one symbol per row of p [n, V]
            u = rng.random((p.shape[0], 1))
            return np.minimum((p.cumsum(-1) < u).sum(-1), self.vocab - 1)

        seqs[:, 0] = draw(np.broadcast_to(self.initial, (n, self.vocab)))
        for t in range(1, length):
            if t < self.order:  # order 2, the second symbol
                seqs[:, t] = draw(self.first[seqs[:, 0]])
            else:
                seqs[:, t] = draw(self.transitions[self._state(seqs, t)])
        return seqs

    def log_probs(self, seqs: np.ndarray) -> np.ndarray:
        """log p of each symbol of ``seqs`` [n, length] under the source: float64 [n, length]."""
        out = np.empty(seqs.shape)
        out[:, 0] = np.log(self.initial[seqs[:, 0]])
        for t in range(1, seqs.shape[1]):
            table = self.first[seqs[:, 0]] if t < self.order else self.transitions[self._state(seqs, t)]
            out[:, t] = np.log(table[np.arange(len(seqs)), seqs[:, t]])
        return out

    def entropy_per_token(self, length: int) -> float:
        """The exact expected NLL per symbol of the source's own chains of ``length`` symbols (nats):
        the best any model can score its samples, computed from the state marginals."""
        total = _entropy(self.initial)
        if self.order == 1:
            marginal = self.initial
            conditional = _entropy(self.transitions)
            for _ in range(1, length):
                total += marginal @ conditional
                marginal = marginal @ self.transitions
            return float(total / length)
        if length > 1:
            total += self.initial @ _entropy(self.first)
        pair = (self.initial[:, None] * self.first).reshape(-1)  # p(x1, x2), state a * V + b
        conditional = _entropy(self.transitions)
        V = self.vocab
        for _ in range(2, length):
            total += pair @ conditional
            # p(b, c) = sum_a p(a, b) T[(a, b), c]
            pair = (pair[:, None] * self.transitions).reshape(V, V, V).sum(0).reshape(-1)
        return float(total / length)


@dataclass
class SampleNLL:
    """Exact NLL of samples under the source, nats per symbol."""
    mean: float
    low: float  # 95% bootstrap interval of the mean over samples
    high: float
    per_sample: np.ndarray  # [n]
    invalid: int  # special ids (BOS/EOS) generated where symbols belong, scored at the least likely symbol


def exact_nll(source: MarkovSource, samples: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> SampleNLL:
    """``samples`` [n, L]: BOS then L - 1 generated ids. Each sample's NLL per symbol under the source
    (an id that is no symbol counts as the least likely symbol of the table it was drawn from, and
    the chain goes on from symbol 0), with a 95% percentile bootstrap interval of the mean."""
    symbols = np.asarray(samples)[:, 1:].astype(np.int64)
    invalid = (symbols < 0) | (symbols >= source.vocab)
    log_p = source.log_probs(np.where(invalid, 0, symbols))
    floor = np.log(min(source.initial.min(), source.transitions.min(),
                       source.first.min() if source.first is not None else 1.0))
    log_p[invalid] = floor
    per_sample = -log_p.mean(1)
    rng = np.random.default_rng(seed)
    means = per_sample[rng.integers(0, len(per_sample), (resamples, len(per_sample)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return SampleNLL(float(per_sample.mean()), float(low), float(high), per_sample, int(invalid.sum()))


def unigram_entropies(rows: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each row's token frequencies: [n, L] -> [n]."""
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        counts = np.bincount(row)
        p = counts[counts > 0] / len(row)
        out[i] = -(p * np.log(p)).sum()
    return out


def exact_sample_quality(source: MarkovSource, samples: np.ndarray) -> dict[str, float]:
    """{nll, nll_low, nll_high, source_entropy, nll_gap, invalid, source_unigram_entropy}: the samples'
    exact NLL per symbol, its 95% interval, the ideal, the gap to it (nats per symbol), and the mean
    unigram entropy of the source's own sequences (BOS included, as in the samples' ``entropy``),
    against which a collapse of the samples shows."""
    nll = exact_nll(source, samples)
    ideal, own_entropy = source_reference(source, samples.shape[1] - 1)
    return {"nll": nll.mean, "nll_low": nll.low, "nll_high": nll.high, "source_entropy": ideal,
            "nll_gap": nll.mean - ideal, "invalid": nll.invalid, "source_unigram_entropy": own_entropy}


def source_reference(source: MarkovSource, length: int) -> tuple[float, float]:
    """(exact NLL per symbol, mean unigram entropy of 1024 of its own chains) at ``length``: the same
    for every call, so computed once per source and length (an evaluation calls it per cell/round)."""
    if length not in source._references:
        chains = source.sample(1024, length, np.random.default_rng(12345))
        own = np.concatenate([np.full((len(chains), 1), source.vocab), chains], axis=1)
        source._references[length] = (source.entropy_per_token(length),
                                      float(unigram_entropies(own).mean()))
    return source._references[length]


# -- the builder ----------------------------------------------------------------------------
@dataclass
class SyntheticSettings:
    vocab: int = 64
    order: int = 1
    successors: int = 4
    seq_len: int = 64
    seed: int = 0
    smoothing: float = 0.01
    train_sequences: int = 50_000
    val_sequences: int = 1_000
    samples_per_shard: int | None = None


def build_synthetic(out: Path, settings: SyntheticSettings = SyntheticSettings(), log=print) -> DatasetMeta:
    """Write (or reuse) a synthetic data folder; returns its metadata. Ids: the ``vocab`` symbols,
    then BOS = vocab, EOS = vocab + 1 (never in the data: every sequence is one chain)."""
    out, s = Path(out), settings
    if s.seq_len < 2:
        raise DataError(f"--seq-len must be >= 2 (BOS and one symbol), got {s.seq_len}")
    if s.train_sequences < 1 or s.val_sequences < 1:
        raise DataError("--train-sequences and --val-sequences must be >= 1")
    try:
        source = MarkovSource.random(s.vocab, s.order, s.successors, s.seed, s.smoothing)
    except ValueError as err:
        raise DataError(str(err)) from None
    fingerprint = hashlib.sha256(json.dumps([BUILDER_VERSION, "synthetic-2", vars(s)], sort_keys=True).encode()
                                 ).hexdigest()
    reused = reuse_or_reset(out, fingerprint, log)
    if reused is not None:
        return reused
    source.save(out / SOURCE_FILE)
    bos, eos = s.vocab, s.vocab + 1
    vocab_size = s.vocab + 2
    write_id_codec(out / TOKENIZER_FILE, vocab_size, bos=bos, eos=eos)
    per_shard, reason = samples_per_shard_for(s.train_sequences, s.samples_per_shard, "sequences")
    rng = np.random.default_rng([s.seed, 1])
    dtype = token_dtype(vocab_size)
    infos, dropped = {}, 0
    for split, count in (("train", s.train_sequences), ("val", s.val_sequences)):
        writer = ShardWriter(out, split, per_shard)
        chains = source.sample(count, s.seq_len - 1, rng)
        for chain in chains:
            writer.add(np.concatenate([[bos], chain]).astype(dtype))
        # every train shard holds the same count (the loaders' resume arithmetic): the rest is dropped
        dropped += writer.close(keep_partial=split == "val")
        writer.info.documents = writer.info.samples
        infos[split] = writer.info
    meta = DatasetMeta(
        vocab_size=vocab_size, seq_len=s.seq_len, special_ids={"bos": bos, "eos": eos}, dtype=dtype.name,
        samples_per_shard=per_shard, samples_per_shard_reason=reason, train=infos["train"], val=infos["val"],
        dropped_blocks=dropped,
        tokenizer_sha256=file_sha256(out / TOKENIZER_FILE),
        sources=[f"synthetic order-{s.order} Markov source: {s.vocab} symbols, {s.successors} likely successors, "
                 f"seed {s.seed}"],
        settings_fingerprint=fingerprint,
        synthetic={**vars(s), "entropy_per_token": source.entropy_per_token(s.seq_len - 1)})
    write_json_atomic(out / META_FILE, meta.to_dict())
    log(f"wrote {infos['train'].shards} train shards ({infos['train'].samples} sequences; {dropped} trailing ones "
        f"dropped to keep shards equal) and {infos['val'].shards} "
        f"val shards of a synthetic order-{s.order} Markov source to {out}; its entropy: "
        f"{meta.synthetic['entropy_per_token']:.4f} nats per symbol at length {s.seq_len - 1}")
    return meta

