"""The synthetic corpus with a known likelihood: the exact NLL against a hand computation on a
two-state source, the source's entropy against its definition, and the builder's shards against
the source's tables (and its id codec through a checkpoint's tokenizer path)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pgm_dist.data.shards import DataFolder, iter_shard
from pgm_dist.data.synthetic import (
    SOURCE_FILE,
    MarkovSource,
    SyntheticSettings,
    build_synthetic,
    exact_nll,
    exact_sample_quality,
)
from pgm_dist.data.tokenizer import Tokenizer

TWO_STATE = MarkovSource(initial=np.array([0.25, 0.75]), transitions=np.array([[0.9, 0.1], [0.4, 0.6]]), order=1)


def test_exact_nll_of_a_two_state_chain_by_hand():
    # BOS (id 2), then 0 1 1 0: -log(0.25 * 0.1 * 0.6 * 0.4) / 4 per symbol
    samples = np.array([[2, 0, 1, 1, 0], [2, 1, 1, 1, 1]])
    nll = exact_nll(TWO_STATE, samples)
    first = -(math.log(0.25) + math.log(0.1) + math.log(0.6) + math.log(0.4)) / 4
    second = -(math.log(0.75) + 3 * math.log(0.6)) / 4
    assert nll.per_sample == pytest.approx([first, second], abs=1e-12)
    assert nll.mean == pytest.approx((first + second) / 2, abs=1e-12)
    assert nll.low <= nll.mean <= nll.high and nll.invalid == 0


def test_a_special_id_among_the_symbols_scores_as_the_least_likely_symbol():
    nll = exact_nll(TWO_STATE, np.array([[2, 3, 0]]))  # EOS where a symbol belongs, then 0 (from state 0)
    assert nll.invalid == 1
    assert nll.mean == pytest.approx(-(math.log(0.1) + math.log(0.9)) / 2, abs=1e-12)


def test_the_entropy_per_symbol_of_a_two_state_chain_by_hand():
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    # length 3: H(initial) + E[H(T[x1])] + E[H(T[x2])], x1 ~ (.25, .75), x2 ~ (.25 .9 + .75 .4, ...)
    m2 = np.array([0.25, 0.75]) @ TWO_STATE.transitions
    expected = (h([0.25, 0.75]) + 0.25 * h([0.9, 0.1]) + 0.75 * h([0.4, 0.6])
                + m2[0] * h([0.9, 0.1]) + m2[1] * h([0.4, 0.6])) / 3
    assert TWO_STATE.entropy_per_token(3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_the_entropy_is_the_mean_nll_of_the_sources_own_chains(order):
    source = MarkovSource.random(vocab=6, order=order, successors=2, seed=3)
    chains = source.sample(20_000, 12, np.random.default_rng(0))
    monte_carlo = -source.log_probs(chains).mean()
    assert monte_carlo == pytest.approx(source.entropy_per_token(12), abs=0.02)
    quality = exact_sample_quality(source, np.concatenate([np.full((len(chains), 1), 6), chains], axis=1))
    assert quality["nll_gap"] == pytest.approx(0, abs=0.02)
    assert quality["nll_low"] < quality["nll"] < quality["nll_high"]


def test_the_sources_reference_is_computed_once_per_length_and_equals_a_fresh_one(monkeypatch):
    source = MarkovSource.random(vocab=6, order=1, successors=2, seed=3)
    fresh = MarkovSource.random(vocab=6, order=1, successors=2, seed=3)
    samples = np.concatenate([np.full((50, 1), 6), source.sample(50, 12, np.random.default_rng(1))], axis=1)
    first = exact_sample_quality(source, samples)
    drawn = []
    monkeypatch.setattr(source, "sample", lambda *a: drawn.append(a) or fresh.sample(*a))
    assert exact_sample_quality(source, samples) == first and not drawn  # cached: no new chains
    assert exact_sample_quality(source, samples[:, :8])["source_entropy"] == fresh.entropy_per_token(7)
    assert len(drawn) == 1  # another length: computed for it
    assert exact_sample_quality(fresh, samples) == first


def test_every_row_is_sparse_and_smoothed():
    source = MarkovSource.random(vocab=20, order=2, successors=3, seed=1, smoothing=0.01)
    assert source.transitions.shape == (400, 20) and source.first.shape == (20, 20)
    assert np.allclose(source.transitions.sum(-1), 1) and source.transitions.min() >= 0.01 / 20 - 1e-15
    likely = (source.transitions > 0.01 / 20 + 1e-12).sum(-1)
    assert (likely <= 3).all()


def test_the_builders_shards_follow_the_sources_tables(tmp_path):
    settings = SyntheticSettings(vocab=5, order=1, successors=2, seq_len=33, seed=7, train_sequences=3000,
                                 val_sequences=50)
    meta = build_synthetic(tmp_path / "syn", settings, log=lambda *_: None)
    folder = DataFolder.open(tmp_path / "syn")
    source = MarkovSource.load(folder.path / SOURCE_FILE)
    assert (meta.vocab_size, meta.seq_len, meta.special_ids) == (7, 33, {"bos": 5, "eos": 6})
    assert meta.synthetic["entropy_per_token"] == pytest.approx(source.entropy_per_token(32))
    rows = np.stack([tokens for url in sorted(folder.path.glob("train-*.tar")) for _, tokens in iter_shard(str(url))])
    per_shard = meta.samples_per_shard  # automatic: 3000 // 64 = 46, so 65 full shards and 10 dropped
    assert (per_shard, meta.train.shards, meta.dropped_blocks) == (46, 65, 10)
    assert rows.shape == (65 * 46, 33) and (rows[:, 0] == 5).all() and (rows[:, 1:] < 5).all()
    counts = np.zeros((5, 5))
    np.add.at(counts, (rows[:, 1:-1].ravel(), rows[:, 2:].ravel()), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    assert np.abs(empirical - source.transitions).max() < 0.03  # ~19k transitions per row
    first = np.bincount(rows[:, 1], minlength=5) / len(rows)
    assert np.abs(first - source.initial).max() < 0.04
    # the id codec: ids are the symbols
    codec = Tokenizer(folder.tokenizer_path)
    assert (codec.vocab_size, codec.bos_id, codec.eos_id) == (7, 5, 6)
    assert codec.decode([5, 3, 0, 4, 6]) == "3 0 4" and codec.encode("3 0 4") == [3, 0, 4]
    assert codec.sha256 == meta.tokenizer_sha256
    # a second build with the same settings is reused
    again = build_synthetic(tmp_path / "syn", settings, log=lambda *_: None)
    assert again.settings_fingerprint == meta.settings_fingerprint
