"""Hugging Face tokenizers in the data builder: a GPT-2-style byte-level BPE trained here with the
``tokenizers`` library (no download), resolved from a tokenizer.json and from a tokenizer folder
through ``transformers``; blocks wrapped as the reference prepares OpenWebText."""
import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer

from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.shards import DataFolder, expand_sources, iter_shard
from pgm_dist.data.tokenizer import Tokenizer, write_hf_tokenizer
from tests.helpers.hf import END, sample_texts, train_bpe, write_jsonl

L = 24


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(tokenizer.json, tokenizer folder, documents folder, texts): GPT-2's recipe at vocabulary 400."""
    tmp = tmp_path_factory.mktemp("hf")
    texts = sample_texts()
    file, folder = train_bpe(texts, tmp)
    return file, folder, write_jsonl(texts, tmp / "docs"), texts


def test_a_tokenizer_json_and_a_tokenizer_folder_give_the_same_codec(bpe, tmp_path):
    file, folder, _, texts = bpe
    from_file = write_hf_tokenizer(tmp_path / "a.model", str(file))
    from_folder = write_hf_tokenizer(tmp_path / "b.model", str(folder))  # through transformers.AutoTokenizer
    backend = BackendTokenizer.from_file(str(file))
    end = backend.token_to_id(END)
    for tok in (from_file, from_folder):
        assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id) == (end, end, end)
        assert tok.vocab_size == backend.get_vocab_size() > 256 and end == tok.vocab_size - 1
        for text in texts:
            ids = tok.encode(text)
            assert ids == backend.encode(text).ids and end not in ids
            assert tok.decode(ids) == text  # byte-level: every text round-trips
            assert tok.decode([end, *ids, end, end]) == text  # BOS / EOS / PAD dropped
    assert from_file.sha256 == from_folder.sha256  # one file for one tokenizer, however it was named
    assert from_file.encode_batch(texts[:3]) == [from_file.encode(t) for t in texts[:3]]
    assert Tokenizer(tmp_path / "a.model").sha256 == from_file.sha256


def test_build_wraps_documents_as_the_reference_prepares_openwebtext(bpe, tmp_path):
    """Each document's ids and EOS, concatenated in order, cut into L - 2 ids between BOS and EOS."""
    file, _, docs, texts = bpe
    out = tmp_path / "out"
    assert data_cli(["build", "--out", str(out), "--input", str(docs), "--hf-tokenizer", str(file), "--seq-len",
                     str(L), "--val-fraction", "0", "--samples-per-shard", "3", "--workers", "2",
                     "--no-progress"]) == 0
    tok = Tokenizer(out / "tokenizer.model")
    backend = BackendTokenizer.from_file(str(file))
    end = backend.token_to_id(END)
    stream = [i for text in texts for i in [*backend.encode(text).ids, end]]
    body = L - 2
    expected = [[end, *stream[k:k + body], end] for k in range(0, len(stream) - body + 1, body)]
    expected = expected[:len(expected) // 3 * 3]  # whole train shards only
    blocks = [b.tolist() for url in expand_sources(str(out / "train-*.tar")) for _, b in iter_shard(url)]
    assert blocks == expected
    folder = DataFolder.open(out)
    assert folder.meta.vocab_size == tok.vocab_size == end + 1
    assert folder.meta.special_ids == {"unk": None, "bos": end, "eos": end, "pad": end}
    assert folder.meta.tokenizer_sha256 == tok.sha256
    # a rebuild with the same tokenizer is reused, not redone
    assert data_cli(["build", "--out", str(out), "--input", str(docs), "--hf-tokenizer", str(file), "--seq-len",
                     str(L), "--val-fraction", "0", "--samples-per-shard", "3", "--no-progress"]) == 0
    assert [b.tolist() for url in expand_sources(str(out / "train-*.tar")) for _, b in iter_shard(url)] == blocks


def test_hf_tokenizer_errors(bpe, tmp_path, capsys):
    file, _, docs, _ = bpe
    base = ["build", "--out", str(tmp_path / "out"), "--input", str(docs), "--no-progress"]
    assert data_cli([*base, "--hf-tokenizer", "no such//tokenizer"]) == 2  # neither a path nor a Hub name
    assert "cannot load the Hugging Face tokenizer 'no such//tokenizer'" in capsys.readouterr().err
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("{not json")
    assert data_cli([*base, "--hf-tokenizer", str(not_json)]) == 2
    assert "is not a Hugging Face tokenizer.json" in capsys.readouterr().err
    nameless = tmp_path / "nameless.json"
    plain = BackendTokenizer.from_file(str(file))
    plain.add_special_tokens(["<unnamed>"])
    data = json.loads(plain.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != END]
    nameless.write_text(json.dumps(data))
    assert data_cli([*base, "--hf-tokenizer", str(nameless)]) == 2
    assert "names no BOS/CLS or EOS/SEP token" in capsys.readouterr().err
    assert data_cli([*base, "--hf-tokenizer", str(file), "--tokenizer", str(file)]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_tokenizer_json_given_as_tokenizer_says_to_use_hf_tokenizer(bpe, tmp_path, capsys):
    file, _, docs, _ = bpe
    assert data_cli(["build", "--out", str(tmp_path / "out"), "--input", str(docs), "--tokenizer", str(file),
                     "--no-progress"]) == 2
    assert "given to the data builder with --hf-tokenizer" in capsys.readouterr().err
