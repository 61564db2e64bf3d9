"""``distill.py --teacher FILE.ckpt``: SDTT from a released reference checkpoint (release layout made
by tests/helpers/reference.py over a byte-level BPE's vocabulary), on data built with that tokenizer.
The first teacher is the file's raw weights, converted (as the paper's SDTT starts from them)."""
from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from pgm_dist.checkpoints.reference import load_reference
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.tokenizer import write_hf_tokenizer
from tests.helpers.hf import sample_texts, train_bpe, write_jsonl
from tests.helpers.reference import random_reference_state, reference_layout, save_release
from tests.helpers.training import run_train, scalars


def test_distill_a_released_checkpoint_file(tmp_path):
    texts = sample_texts(200)
    file, _ = train_bpe(texts, tmp_path / "bpe")
    vocab = write_hf_tokenizer(tmp_path / "tok.model", str(file)).vocab_size
    data = tmp_path / "data"
    assert data_cli(["build", "--out", str(data), "--input", str(write_jsonl(texts, tmp_path / "docs")),
                     "--hf-tokenizer", str(file), "--seq-len", "32", "--val-fraction", "0.1",
                     "--samples-per-shard", "8", "--no-progress"]) == 0
    layout = reference_layout("pgm", vocab + 1, 64, 2, n_enc=2, n_dec=2)
    ckpt = save_release(tmp_path / "pgm_8_8.ckpt", random_reference_state(layout, 5),
                        random_reference_state(layout, 6))
    out = tmp_path / "run"
    args = ["--teacher", str(ckpt), "--data", str(data), "--out", str(out), "--start-steps", "8", "--round-steps", "2",
            "--rounds", "1", "--min-steps", "2", "--global-batch", "4", "--micro-batch", "2", "--log-every", "1",
            "--eval-every", "0", "--ckpt-every", "1", "--eval-batches", "1", "--sample-steps", "2", "--num-samples",
            "1", "--eval-samples", "1", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "2"]
    done = run_train(args, launcher=False, script="pgm_dist/distill.py")
    assert f"distilling {ckpt}" in done.stdout
    teacher = load_file(str(out / "checkpoints" / "step_00000002" / "teacher.safetensors"))
    raw = load_reference(ckpt, "raw", seq_len=32)[1]
    assert teacher.keys() == raw.keys()
    for name, tensor in raw.items():
        torch.testing.assert_close(teacher[name], tensor, atol=0, rtol=0)
    losses = scalars(out / "tb")["train/loss"]
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())

    missing = run_train([a for a in args if a not in (str(data), "--data")] + ["--out", str(tmp_path / "other")],
                        launcher=False, script="pgm_dist/distill.py", check=False)
    assert missing.returncode == 2 and "needs --data" in missing.stderr
