"""A data folder tokenized by a Hugging Face tokenizer (a GPT-2-style byte-level BPE trained here):
build, train, export, sample; the samples decode through the tokenizer the export carries."""
from __future__ import annotations

import torch

from pgm_dist.checkpoints.load import load_model
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.tokenizer import Tokenizer
from pgm_dist.export import main as export_main
from pgm_dist.sample import main as sample_main
from pgm_dist.sampling import generate
from tests.helpers.hf import sample_texts, train_bpe, write_jsonl
from tests.helpers.training import run_train


def test_build_train_export_and_sample_with_a_hugging_face_tokenizer(tmp_path, capsys):
    texts = sample_texts(200)
    _, snapshot = train_bpe(texts, tmp_path / "bpe")
    data = tmp_path / "data"
    assert data_cli(["build", "--out", str(data), "--input", str(write_jsonl(texts, tmp_path / "docs")),
                     "--hf-tokenizer", str(snapshot), "--seq-len", "32", "--val-fraction", "0.1",
                     "--samples-per-shard", "8", "--no-progress"]) == 0
    out = tmp_path / "run"
    run_train(["--data", str(data), "--out", str(out), "--max-steps", "4",
               "--global-batch", "4", "--micro-batch", "4", "--eval-every", "4", "--eval-batches", "1",
               "--sample-steps", "2", "--num-samples", "1", "--ckpt-every", "4"], launcher=False)
    export = tmp_path / "export"
    assert export_main(["--ckpt", str(out), "--out", str(export)]) == 0
    loaded = load_model(export)
    built = Tokenizer(data / "tokenizer.model")
    assert loaded.tokenizer.kind == "hf" and loaded.tokenizer.sha256 == built.sha256
    assert loaded.config.vocab_size == built.vocab_size and loaded.config.bos_id == built.bos_id == built.eos_id
    capsys.readouterr()
    prompt = "alpha beta"
    assert sample_main(["--model", str(export), "--num", "2", "--steps", "4", "--seed", "3", "--prompt", prompt,
                        "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    # the command's texts are the tokenizer's decoding of the same draws, each starting with the prompt
    ids = built.encode(prompt)
    rows = generate(loaded.model, 2, 4, prompt=[(p + 1, t) for p, t in enumerate(ids)],
                    generator=torch.Generator().manual_seed(3))
    expected = "".join(f"--- sample {i} ---\n{built.decode(row.tolist())}\n" for i, row in enumerate(rows))
    assert printed == expected
    assert all(built.decode(row.tolist()).startswith(prompt) for row in rows)
