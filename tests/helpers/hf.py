"""A GPT-2-style byte-level BPE trained with the ``tokenizers`` library (no download): the Hugging Face
tokenizer of the tests, ``<|endoftext|>`` its last id as GPT-2's 50256."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

END = "<|endoftext|>"


def sample_texts(n: int = 40, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "naïve", "日本語", "🙂", "x = 1", "\tindent", "end.", "\n"]
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(n)]


def train_bpe(texts: list[str], folder: Path, vocab_size: int = 400) -> tuple[Path, Path]:
    """Writes FOLDER/tokenizer.json and a tokenizer folder FOLDER/gpt2-like (tokenizer.json and a
    tokenizer_config.json naming BOS and EOS, as a Hub snapshot); returns both paths."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens([END])
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "tokenizer.json"
    backend.save(str(file))
    snapshot = folder / "gpt2-like"
    snapshot.mkdir(exist_ok=True)
    backend.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END, "eos_token": END}))
    return file, snapshot


def write_jsonl(texts: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    return folder
