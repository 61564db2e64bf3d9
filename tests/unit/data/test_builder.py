import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pgm_dist.common.errors import DataError
from pgm_dist.data import builder, shards
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.builder import BuildSettings, build
from pgm_dist.data.documents import default_corpus_paths, list_files, read_documents
from pgm_dist.data.loader import TrainLoader
from pgm_dist.data.shards import DataFolder, DatasetMeta, expand_sources, iter_shard
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


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """What a build leaves: shards, metadata and tokenizer, by file name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "tokenizer.stamp"}


def test_interrupted_build_is_never_finished_and_a_rerun_equals_a_clean_build(built, tmp_path, monkeypatch):
    tmp, _, _, _ = built
    settings = BuildSettings(seq_len=L, val_fraction=0.0, samples_per_shard=2, workers=1,
                             tokenizer=tmp / "out" / "tokenizer.model")
    clean = build(tmp_path / "clean", [tmp / "docs"], settings, progress=False, log=lambda *_: None)
    assert clean.train.shards > 3
    real_write_shard = shards.write_shard

    def crash_after_two_shards(path, samples):
        """The third shard dies half-written (``write_shard`` names a partial shard ``.tmp``)."""
        if len(list(path.parent.glob("train-*.tar"))) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a tar")
            raise OSError("No space left on device")
        return real_write_shard(path, samples)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(shards, "write_shard", crash_after_two_shards)  # the one shard writer's
    with pytest.raises(OSError, match="No space left"):
        build(out, [tmp / "docs"], settings, progress=False, log=lambda *_: None)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar", "train-000001.tar",
                                                           "train-000002.tar.tmp"]
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="not a finished data folder"):
        DataFolder.open(out)
    lines = []
    assert build(out, [tmp / "docs"], settings, progress=False, log=lines.append) == clean
    assert not any("up to date" in line for line in lines)
    assert _folder_bytes(out) == _folder_bytes(tmp_path / "clean")


def test_rebuild_from_other_inputs_deletes_stale_shards(built, tmp_path):
    tmp, _, _, _ = built
    settings = BuildSettings(seq_len=L, val_fraction=0.3, samples_per_shard=2, workers=1,
                             tokenizer=tmp / "out" / "tokenizer.model")
    fewer_docs = [tmp / "docs" / "d.jsonl"]
    before = build(tmp_path / "folder", [tmp / "docs"], settings, progress=False, log=lambda *_: None)
    lines = []
    after = build(tmp_path / "folder", fewer_docs, settings, progress=False, log=lines.append)
    assert any("rebuilding" in line for line in lines)
    assert after.train.shards < before.train.shards and after.val.shards < before.val.shards
    reference = build(tmp_path / "reference", fewer_docs, settings, progress=False, log=lambda *_: None)
    assert after == reference
    assert _folder_bytes(tmp_path / "folder") == _folder_bytes(tmp_path / "reference")


def test_small_corpus_gets_a_smaller_automatic_shard_size(tmp_path, monkeypatch):
    """~300 KB of text fills less than one default shard (1024 blocks of 256 tokens); without
    --samples-per-shard the builder cuts the same blocks into at least 64 shards and says so."""
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(300)] + ["the", "of", "and", "a", "to"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, size=200))}) for _ in range(300)))
    assert 250_000 < docs.stat().st_size < 500_000
    lines = []
    auto = build(tmp_path / "auto", [docs], BuildSettings(vocab_size=400, val_fraction=0.05, workers=1),
                 progress=False, log=lines.append)
    tokenizer = tmp_path / "auto" / "tokenizer.model"
    everything = build(tmp_path / "all", [docs], BuildSettings(val_fraction=0.05, samples_per_shard=1,
                                                              workers=1, tokenizer=tokenizer),
                       progress=False, log=lambda *_: None)
    train_blocks = everything.train.samples  # one block per shard: nothing dropped
    assert 64 < train_blocks < 1024
    per_shard = train_blocks // 64
    assert auto.samples_per_shard == per_shard and auto.train.shards == train_blocks // per_shard >= 64
    assert auto.samples_per_shard_reason.startswith("automatic") and f"{train_blocks} train blocks" in lines[-2]
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["samples_per_shard"] == per_shard
    assert auto.dropped_blocks == train_blocks % per_shard
    blocks = _blocks(tmp_path / "auto", "train")
    assert len(blocks) == auto.train.shards * per_shard
    assert np.array_equal(np.stack(blocks), np.stack(_blocks(tmp_path / "all", "train")[:len(blocks)]))
    assert np.array_equal(np.stack(_blocks(tmp_path / "auto", "val")), np.stack(_blocks(tmp_path / "all", "val")))
    TrainLoader(str(tmp_path / "auto" / "train-*.tar"), seq_len=256, micro_batch=2, rank=1, world_size=8,
                num_workers=8, samples_per_shard=per_shard)  # 64 shards: enough for 8 ranks x 8 workers

    # A corpus that fills 64 default shards keeps the default size (decided while streaming;
    # a default of 4 blocks makes this corpus "big").
    monkeypatch.setattr(builder, "DEFAULT_SAMPLES_PER_SHARD", 4)
    big = build(tmp_path / "big", [docs], BuildSettings(val_fraction=0.05, workers=1, tokenizer=tokenizer),
                progress=False, log=lambda *_: None)
    assert big.samples_per_shard == 4 and big.samples_per_shard_reason == "default"
    assert big.train.shards == train_blocks // 4 and big.val.shards == -(-everything.val.samples // 4)
    for split in ("train", "val"):
        blocks = _blocks(tmp_path / "big", split)
        assert np.array_equal(np.stack(blocks), np.stack(_blocks(tmp_path / "all", split)[:len(blocks)]))
    monkeypatch.undo()

    # An explicit size is honoured: 1024 fails clearly (below one shard), a third of the blocks
    # gives 3 shards, which the loader refuses for 2 ranks x 2 workers.
    with pytest.raises(ValueError, match="fewer than 1024 blocks of 256 tokens: not one train shard"):
        build(tmp_path / "explicit", [docs], BuildSettings(val_fraction=0.05, workers=1,
                                                          samples_per_shard=1024, tokenizer=tokenizer),
              progress=False, log=lambda *_: None)
    few = build(tmp_path / "few", [docs], BuildSettings(val_fraction=0.05, workers=1,
                                                        samples_per_shard=train_blocks // 3, tokenizer=tokenizer),
                progress=False, log=lambda *_: None)
    assert few.train.shards == 3 and few.samples_per_shard_reason == "--samples-per-shard"
    with pytest.raises(DataError, match="3 shards for 2 ranks x 2 loader workers: at least 4 are needed"):
        TrainLoader(str(tmp_path / "few" / "train-*.tar"), seq_len=256, micro_batch=2, world_size=2, num_workers=2)


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


def test_a_vocabulary_smaller_than_the_corpuss_characters_says_how_large_it_must_be(tmp_path):
    from pgm_dist.data.tokenizer import train_tokenizer

    texts = ["".join(chr(0x4E00 + i) for i in range(j, j + 40)) for j in range(0, 400, 40)]  # 400 distinct chars
    advice = r"could not train a 64-token model: .*use a --vocab-size of at least (\d+)"
    with pytest.raises(ValueError, match=advice) as err:
        train_tokenizer(texts, tmp_path / "tok.model", 64)
    needed = int(err.value.args[0].rsplit("at least ", 1)[1].split()[0])
    assert 400 + 256 <= needed < 680  # the characters, 256 byte-fallback pieces and the special pieces
    train_tokenizer(texts, tmp_path / "tok.model", needed)  # the size it names trains
