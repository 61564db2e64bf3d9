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

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) not in (self.bos_id, self.eos_id))


class Tokenizer:
    """A trained sentencepiece model with BOS/EOS/PAD ids reserved, or (a synthetic folder's) an id codec."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer {path} not found: build the data folder with `python -m pgm_dist.data build`, "
                "or pass --tokenizer")
        self.path = path
        data = path.read_bytes()
        self.ids = IdCodec(json.loads(data)) if data.startswith(ID_CODEC_MAGIC) else None
        self.sp = None if self.ids else spm.SentencePieceProcessor(model_file=str(path))
        self.sha256 = file_sha256(path)

    @property
    def vocab_size(self) -> int:
        return self.ids.vocab_size if self.ids else self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.ids.bos_id if self.ids else self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.ids.eos_id if self.ids else self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.ids.pad_id if self.ids else self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.ids.encode(text) if self.ids else self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.ids.encode(text) for text in texts] if self.ids else self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids, dropping the special BOS/EOS/PAD ids."""
        if self.ids:
            return self.ids.decode(ids)
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])


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
