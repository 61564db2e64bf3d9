"""Parquet files and Hugging Face datasets as the builder's inputs: the same documents in the same
order give the same shards as a .jsonl file (one Hugging Face tokenizer for all: no training
variance), the text column chosen with --text-field; the training loader resumes over them."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder, expand_sources, iter_shard
from tests.helpers.hf import sample_texts, train_bpe

L = 24


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(tokenizer.json, {kind: build arguments}): the same 60 documents as jsonl, as two Parquet files
    and as a local Hugging Face dataset folder (Parquet data files), the text under "content"."""
    tmp = tmp_path_factory.mktemp("inputs")
    texts = sample_texts(60, seed=2)
    file, _ = train_bpe(texts, tmp / "bpe")
    (tmp / "jsonl").mkdir()
    (tmp / "jsonl" / "d.jsonl").write_text("\n".join(json.dumps({"content": t, "n": i}) for i, t in enumerate(texts)))
    parts = [texts[:25], texts[25:]]
    for folder in ("parquet", "hf/data"):
        (tmp / folder).mkdir(parents=True)
        for k, part in enumerate(parts):
            table = pa.table({"n": list(range(len(part))), "content": part})
            pq.write_table(table, tmp / folder / f"train-{k:05d}-of-00002.parquet", row_group_size=7)
    return file, {"jsonl": ["--input", str(tmp / "jsonl")], "parquet": ["--input", str(tmp / "parquet")],
                  "hf": ["--hf-dataset", str(tmp / "hf")]}


def _build(out, file, source, *extra):
    return data_cli(["build", "--out", str(out), *source, "--hf-tokenizer", str(file), "--seq-len", str(L),
                     "--val-fraction", "0.2", "--samples-per-shard", "4", "--text-field", "content",
                     "--no-progress", *extra])


def _blocks(folder, split):
    return [b.tolist() for url in expand_sources(str(folder / f"{split}-*.tar")) for _, b in iter_shard(url)]


def test_parquet_and_a_hugging_face_dataset_give_the_shards_of_the_same_jsonl(inputs, tmp_path):
    file, sources = inputs
    for kind, source in sources.items():
        assert _build(tmp_path / kind, file, source) == 0, kind
    reference = {split: _blocks(tmp_path / "jsonl", split) for split in ("train", "val")}
    assert len(reference["train"]) >= 8 and reference["val"]
    for kind in ("parquet", "hf"):
        assert {split: _blocks(tmp_path / kind, split) for split in ("train", "val")} == reference, kind
    meta = DataFolder.open(tmp_path / "hf").meta
    assert meta.train.documents + meta.val.documents == 60
    assert meta.sources == [{"hf_dataset": {"name": sources["hf"][1], "config": None, "split": "train",
                                            "revision": None}}]
    assert _build(tmp_path / "nosplit", file, [*sources["hf"], "--hf-split", "validation"]) == 2


def test_the_loader_resumes_over_shards_built_from_a_dataset(inputs, tmp_path):
    file, sources = inputs
    assert _build(tmp_path / "hf", file, sources["hf"]) == 0
    pattern = str(tmp_path / "hf" / "train-*.tar")

    def loader():
        return TrainLoader(pattern, seq_len=L, micro_batch=2, num_workers=0, seed=5)

    whole = loader()
    batches = [next(iter_) for iter_ in [iter(whole)] for _ in range(6)]
    first = loader()
    stream = iter(first)
    for _ in range(3):
        next(stream)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = iter(resumed)
    for expected in batches[3:]:
        np.testing.assert_array_equal(next(rest).numpy(), expected.numpy())


def test_input_errors(inputs, tmp_path, capsys):
    file, sources = inputs
    assert _build(tmp_path / "a", file, sources["parquet"], "--text-field", "text") == 2
    assert "no 'text' column (columns: n, content); name the text column with --text-field" in capsys.readouterr().err
    assert _build(tmp_path / "b", file, [*sources["hf"], *sources["parquet"]]) == 2
    assert "pass --input or --hf-dataset, not both" in capsys.readouterr().err
    assert _build(tmp_path / "c", file, ["--hf-dataset", str(tmp_path / "missing")]) == 2
    assert "cannot open the Hugging Face dataset" in capsys.readouterr().err
    assert _build(tmp_path / "d", file, sources["hf"], "--text-field", "n") == 2
    assert "row 0: no string 'n' field" in capsys.readouterr().err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert _build(tmp_path / "e", file, ["--input", str(broken)]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err


def test_a_gzipped_parquet_file_is_refused_by_name(inputs, tmp_path, capsys):
    file, sources = inputs
    zipped = tmp_path / "docs.parquet.gz"
    zipped.write_bytes(b"\x1f\x8b")
    assert _build(tmp_path / "z", file, ["--input", str(zipped)]) == 2
    assert "Parquet files cannot be gzipped" in capsys.readouterr().err
