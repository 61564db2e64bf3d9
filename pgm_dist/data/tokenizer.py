"""sentencepiece tokenizer: training with settings that round-trip any text, and a thin wrapper."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from pgm_dist.common.files import file_sha256

SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


# The first bytes of an id codec's file (a synthetic folder's ``tokenizer.model``): its symbols are ids.
ID_CODEC_MAGIC = b'{"codec": "ids"'
# The first bytes of a Hugging Face tokenizer's file: its tokenizer.json and the ids of its BOS and EOS.
HF_CODEC_MAGIC = b'{"codec": "hf"'


def write_id_codec(path: Path, vocab_size: int, *, bos: int, eos: int) -> None:
    """An id codec in ``path``: the ``tokenizer.model`` of a folder whose tokens are symbols, not text
    (pgm_dist.data.synthetic). Checkpoints and exports carry it like a sentencepiece model."""
    text = json.dumps({"codec": "ids", "vocab_size": vocab_size, "bos": bos, "eos": eos})
    path.write_text(text)


class IdCodec:
    """Symbols are ids: encode reads space-separated integers, decode writes them (specials dropped)."""

    def __init__(self, values: dict):
        self.vocab_size, self.bos_id, self.eos_id = values["vocab_size"], values["bos"], values["eos"]
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) not in (self.bos_id, self.eos_id))


class SentencePieceCodec:
    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])


class HFCodec:
    """A Hugging Face (``tokenizers``) tokenizer: no special token is added on encoding (the data
    builder places BOS and EOS, as the reference's OpenWebText preparation); BOS, EOS and PAD (= EOS)
    are dropped on decoding. GPT-2's ``<|endoftext|>`` is both BOS and EOS."""

    def __init__(self, values: dict):
        from tokenizers import Tokenizer as BackendTokenizer

        self.backend = BackendTokenizer.from_str(json.dumps(values["tokenizer"]))
        self.bos_id, self.eos_id = values["bos"], values["eos"]
        self.pad_id = self.eos_id
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.bos_id, self.eos_id}
        return self.backend.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=False)


# How a reference names the roles when the tokenizer itself does not say (a bare tokenizer.json).
_BOS_NAMES = ("<|endoftext|>", "<s>", "[BOS]", "<bos>", "[CLS]", "<|begin_of_text|>")
_EOS_NAMES = ("<|endoftext|>", "</s>", "[EOS]", "<eos>", "[SEP]", "<|end_of_text|>")


def _roles_by_name(backend) -> tuple[int | None, int | None]:
    vocab = backend.get_vocab(with_added_tokens=True)
    bos = next((vocab[name] for name in _BOS_NAMES if name in vocab), None)
    eos = next((vocab[name] for name in _EOS_NAMES if name in vocab), None)
    return bos, eos


def write_hf_tokenizer(path: Path, name_or_path: str) -> "Tokenizer":
    """Resolve a Hugging Face tokenizer and write it to ``path`` as one file (its ``tokenizer.json`` and
    the ids of BOS and EOS), atomically. ``name_or_path``: a ``tokenizer.json`` file; a tokenizer
    folder; or a name ``transformers`` resolves from its local cache or the Hub (``gpt2``). BOS is the
    tokenizer's BOS, else its CLS; EOS its EOS, else its SEP (the reference's rule); a bare
    ``tokenizer.json`` is read by its special tokens' names."""
    source = Path(name_or_path)
    if source.is_file():
        from tokenizers import Tokenizer as BackendTokenizer

        try:
            backend = BackendTokenizer.from_file(str(source))
        except Exception as err:  # the tokenizers library raises its own exception types
            raise ValueError(f"{source} is not a Hugging Face tokenizer.json: {err}") from None
        bos, eos = _roles_by_name(backend)
        text = backend.to_str()
    else:
        try:
            import transformers
        except ImportError:
            raise ValueError(f"resolving the Hugging Face tokenizer {name_or_path!r} needs transformers: "
                             "pip install transformers (or pass a tokenizer.json file)") from None
        try:
            hf = transformers.AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the Hugging Face tokenizer {name_or_path!r}: {err}") from None
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{name_or_path!r} has no fast (tokenizers) version: pgm_dist reads tokenizer.json")
        bos = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
        eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        text = hf.backend_tokenizer.to_str()
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer {name_or_path!r} names no BOS/CLS or EOS/SEP token: the data builder "
                         "needs both to wrap the blocks")
    # no name or path in the file: the same tokenizer resolved from a name, a folder or a file is the
    # same file (sha256), so that a checkpoint converted with --tokenizer gpt2 matches data built so
    # nor what encode(add_special_tokens=False) never uses: the template adding specials, padding,
    # truncation (transformers sets a template on loading; the bare tokenizer.json has none)
    backend = {**json.loads(text), "post_processor": None, "padding": None, "truncation": None}
    values = {"codec": "hf", "bos": int(bos), "eos": int(eos), "tokenizer": backend}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values))
    os.replace(tmp, path)
    return Tokenizer(path)


def tokenizer_file(spec: str | os.PathLike, path: Path) -> "Tokenizer":
    """Write to ``path`` the tokenizer ``spec`` names: a tokenizer file this project wrote (a data
    folder's ``tokenizer.model``: sentencepiece, Hugging Face or ids), copied; else a Hugging Face
    tokenizer (a name, a folder or a ``tokenizer.json``: :func:`write_hf_tokenizer`)."""
    source = Path(spec)
    if source.is_file():
        head = source.read_bytes()[:64]
        if head.startswith((HF_CODEC_MAGIC, ID_CODEC_MAGIC)) or not head.lstrip().startswith(b"{"):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(source.read_bytes())
            os.replace(tmp, path)
            return Tokenizer(path)
    return write_hf_tokenizer(path, str(spec))


class Tokenizer:
    """The data folder's tokenizer file: a trained sentencepiece model with BOS/EOS/PAD ids reserved,
    a Hugging Face tokenizer (:func:`write_hf_tokenizer`), or a synthetic folder's id codec."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer {path} not found: build the data folder with `python -m pgm_dist.data build`, "
                "or pass --tokenizer")
        self.path = path
        data = path.read_bytes()
        if data.startswith(ID_CODEC_MAGIC):
            self.codec = IdCodec(json.loads(data))
        elif data.startswith(HF_CODEC_MAGIC):
            self.codec = HFCodec(json.loads(data))
        elif data.lstrip().startswith(b"{"):  # JSON but none of ours: a Hugging Face tokenizer.json, most likely
            raise ValueError(f"{path} is a JSON file, not a tokenizer file this project wrote: a Hugging Face "
                             "tokenizer.json is given to the data builder with --hf-tokenizer")
        else:
            self.codec = SentencePieceCodec(path)
        self.kind = {IdCodec: "ids", HFCodec: "hf", SentencePieceCodec: "sentencepiece"}[type(self.codec)]
        self.sha256 = file_sha256(path)

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def bos_id(self) -> int:
        return self.codec.bos_id

    @property
    def eos_id(self) -> int:
        return self.codec.eos_id

    @property
    def pad_id(self) -> int:
        return self.codec.pad_id

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.codec.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids, dropping the special BOS/EOS/PAD ids."""
        return self.codec.decode(ids)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], out_path: Path, vocab_size: int, model_type: str = "bpe",
                    max_sentences: int = 2_000_000, threads: int = 2) -> Tokenizer:
    """Train on the lines of ``texts`` and write ``out_path`` atomically.

    Identity normalisation, no whitespace folding, no dummy prefix, newline and tab as
    pieces and byte fallback: ``decode(encode(text)) == text`` for any text.
    """
    proto = io.BytesIO()
    try:
        _train(texts, proto, vocab_size, model_type, max_sentences, threads)
    except RuntimeError as err:
        # too few pieces for the characters (+ specials) the corpus needs, or too many for its text
        needed = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(err))
        advice = (f"use a --vocab-size of at least {needed.group(1)} (the corpus's characters, 256 byte "
                  "pieces and the specials)" if needed else "use a smaller --vocab-size or more documents")
        raise ValueError(f"sentencepiece could not train a {vocab_size}-token model: {err}; {advice}") from None
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def _train(texts, proto, vocab_size, model_type, max_sentences, threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"],
        unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
        pad_id=SPECIAL_IDS["pad"], input_sentence_size=max_sentences, shuffle_input_sentence=True,
        character_coverage=0.9995, max_sentencepiece_length=16, num_threads=threads, minloglevel=2,
    )
