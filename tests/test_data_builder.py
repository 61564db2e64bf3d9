import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.builder import BuildSettings, build
from pgm_dist.data.documents import default_corpus_paths, list_files, read_documents
from pgm_dist.data.shards import DataError, DataFolder, DatasetMeta, expand_sources, iter_shard
from pgm_dist.data.tokenizer import Tokenizer

L = 32


def _write_corpus(root: Path) -> list[str]:
    """A folder of documents of every supported kind; returns their texts in reading order."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "日本語", "🙂", "x  =  1", "\tindent", "end."]
    texts = []
    for i in range(30):
        texts.append(" ".join(rng.choice(words, size=rng.integers(5, 60))) + ("\n" if i % 3 else "\r\n  "))
    root.mkdir()
    (root / "a.txt").write_text(texts[0], encoding="utf-8")
    (root / "b.md").write_text(texts[1], encoding="utf-8")
    (root / "c.py.gz").write_bytes(gzip.compress(texts[2].encode()))
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[3:20]) + "\n", encoding="utf-8")
    sub = root / "sub"
    sub.mkdir()
    with gzip.open(sub / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t, "id": n}) for n, t in enumerate(texts[20:])))
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return texts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    texts = _write_corpus(tmp / "docs")
    settings = BuildSettings(vocab_size=340, seq_len=L, val_fraction=0.0, samples_per_shard=4, workers=2)
    meta = build(tmp / "out", [tmp / "docs"], settings, progress=False)
    return tmp, texts, meta, settings


def _blocks(folder: Path, split: str) -> list[np.ndarray]:
    return [tokens for url in expand_sources(str(folder / f"{split}-*.tar")) for _, tokens in iter_shard(url)]


def test_blocks_decode_back_to_the_source_documents_in_order(built):
    tmp, texts, meta, _ = built
    tok = Tokenizer(tmp / "out" / "tokenizer.model")
    blocks = _blocks(tmp / "out", "train")
    assert len(blocks) == meta.train.samples > 0
    for block in blocks:
        assert len(block) == L and block[0] == tok.bos_id and block[-1] == tok.eos_id
    stream = np.concatenate([b[1:-1] for b in blocks]).tolist()
    pieces, current = [], []
    for token in stream:
        if token == tok.eos_id:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    assert len(pieces) >= 20
    for i, ids in enumerate(pieces):  # every complete document, exactly and in order
        assert tok.decode(ids) == texts[i]
    assert tok.encode(texts[len(pieces)])[: len(current)] == current  # then the dropped tail's start


def test_shards_are_plain_tars_of_npy_tokens(built):
    tmp, _, meta, _ = built
    shards = sorted((tmp / "out").glob("train-*.tar"))
    assert len(shards) == meta.train.shards
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == 4 and all(n.endswith(".tokens.npy") for n in names)
    tokens = next(iter_shard(str(shards[0])))[1]
    assert tokens.dtype == np.uint16
    meta_json = json.loads((tmp / "out" / "meta.json").read_text())
    assert meta_json["vocab_size"] == 340 and meta_json["seq_len"] == L
    assert meta_json["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert meta_json["train"]["tokens"] == meta.train.samples * L
    assert len(meta_json["sources"][0]["sha256"]) == 64


def test_rerun_reuses_finished_output(built):
    tmp, _, meta, settings = built
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "out").iterdir()}
    lines = []
    again = build(tmp / "out", [tmp / "docs"], settings, progress=False, log=lines.append)
    assert "up to date" in lines[0]
    assert again == meta
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "out").iterdir()} == before


def test_validation_split_and_existing_tokenizer(built, tmp_path):
    tmp, texts, meta, _ = built
    settings = BuildSettings(seq_len=L, val_fraction=0.3, samples_per_shard=2, workers=1,
                             tokenizer=tmp / "out" / "tokenizer.model")
    split = build(tmp_path / "split", [tmp / "docs"], settings, progress=False)
    assert split.tokenizer_sha256 == meta.tokenizer_sha256
    assert split.val.documents > 0 and split.train.documents > 0
    assert split.val.documents + split.train.documents == len(texts)
    assert split.val.shards >= 1


def test_half_written_output_never_looks_finished(built, tmp_path):
    tmp, _, _, settings = built
    out = tmp_path / "partial"
    out.mkdir()
    (out / "train-000000.tar.tmp").write_bytes(b"half a tar")
    with pytest.raises(DataError, match="no shard matches"):
        expand_sources(str(out / "train-*.tar"))
    with pytest.raises(DataError, match="not a finished data folder"):
        DataFolder.open(out)


def test_data_folder_checks(built, tmp_path):
    tmp, _, _, _ = built
    folder = DataFolder.open(tmp / "out", seq_len=L, vocab_size=340)
    assert folder.meta.seq_len == L
    with pytest.raises(DataError, match="length 32 but the run expects 64"):
        DataFolder.open(tmp / "out", seq_len=64)
    with pytest.raises(DataError, match="340-token vocabulary"):
        DataFolder.open(tmp / "out", vocab_size=512)
    with pytest.raises(DataError, match="does not exist"):
        DataFolder.open(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "meta.json").write_text((tmp / "out" / "meta.json").read_text())
    with pytest.raises(DataError, match="tokenizer.model is missing"):
        DataFolder.open(copy)
    assert DatasetMeta.load(copy).vocab_size == 340


def test_input_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_files([tmp_path / "missing"])
    assert data_cli(["build", "--out", str(tmp_path / "o"), "--input", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        read_documents(bad)
    with pytest.raises(ValueError, match="at least 3"):
        BuildSettings(seq_len=2)


def test_default_corpus_is_the_standard_library():
    files = list_files(default_corpus_paths())
    names = {f.name for f in files}
    assert {"os.py", "json"} & names and len(files) > 500
    assert not any("site-packages" in f.parts for f in files)
