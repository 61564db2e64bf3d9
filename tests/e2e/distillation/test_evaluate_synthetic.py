"""``python -m pgm_dist.evaluate`` on a synthetic folder: samples scored exactly under its Markov source."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pgm_dist import evaluate
from pgm_dist.checkpoints.load import load_model
from pgm_dist.data.synthetic import SOURCE_FILE, MarkovSource, SyntheticSettings, build_synthetic
from pgm_dist.sampling import generate
from tests.helpers.training import run_train


def test_evaluate_scores_each_samplers_samples_exactly_under_the_source(tmp_path, capsys):
    data = tmp_path / "synthetic"
    build_synthetic(data, SyntheticSettings(vocab=8, successors=2, seq_len=12, train_sequences=64,
                                            val_sequences=8), log=lambda msg: None)
    run_train(["--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--global-batch", "4",
               "--micro-batch", "4", "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "1",
               "--sample-steps", "2", "--num-samples", "1"], launcher=False)
    model = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert evaluate.main(["--model", str(model), "--batches", "1", "--samples", "3", "--steps", "4",
                          "--seed", "7"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"(\w+) sampler \([0-9,]+ tokens/s\): exact NLL under the source ([0-9.]+) nats/symbol "
                       r"\(95% CI ([0-9.]+)-([0-9.]+)\), source entropy ([0-9.]+)", out)
    assert {line[0] for line in lines} == {"uniform", "binomial"}, out
    source = MarkovSource.load(data / SOURCE_FILE)
    loaded = load_model(model)
    for sampler, nll, low, high, entropy in lines:
        tokens = generate(loaded.model, 3, 4, generator=torch.Generator().manual_seed(7), mode=sampler)
        symbols = tokens[:, 1:].numpy()  # the BOS dropped
        # by hand along each chain; a special id scores as the least likely entry and the chain goes on from 0
        floor = min(source.initial.min(), source.transitions.min())
        total, previous = 0.0, None
        for row in symbols:
            for t, symbol in enumerate(row):
                table = source.initial if t == 0 else source.transitions[previous]
                total += np.log(table[symbol]) if symbol < source.vocab else np.log(floor)
                previous = symbol if symbol < source.vocab else 0
        assert float(nll) == pytest.approx(-total / symbols.size, abs=1e-4), sampler
        assert float(entropy) == pytest.approx(source.entropy_per_token(11), abs=1e-4)
        assert float(low) <= float(nll) <= float(high)
