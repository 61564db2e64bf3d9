"""Sample quality without a reference text: generative perplexity under an evaluator causal
language model (a Hugging Face ``transformers`` folder, ``pip install pgm_dist[eval]``), and the
mean unigram entropy of the samples, which exposes the low-temperature collapse that a low
generative perplexity alone would reward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pgm_dist.common.errors import ConfigError
from pgm_dist.data.synthetic import MarkovSource, exact_sample_quality, unigram_entropies
from pgm_dist.evaluation.nelbo import perplexity
from pgm_dist.sampling import generate


@dataclass
class Evaluator:
    model: torch.nn.Module  # a causal LM in eval mode: model(input_ids [1, T]).logits -> [1, T, V]
    tokenizer: object  # a transformers tokenizer: tokenizer(text)["input_ids"] -> list[int]
    max_length: int  # the longest window the model reads
    path: Path


def load_evaluator(path: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """The model and tokenizer of a ``transformers`` folder (``save_pretrained``); raises
    ``ConfigError`` saying why when it cannot be loaded."""
    path = Path(path)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("--eval-model needs the transformers package: pip install -e '.[eval]'") from None
    if not path.is_dir():
        raise ConfigError(f"--eval-model {path}: no such folder (a Hugging Face causal LM saved with save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--eval-model {path} cannot be loaded as a causal LM with its tokenizer: {err}") from None
    config = model.config
    max_length = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    return Evaluator(model, tokenizer, int(max_length), path)


# How a text longer than the evaluator's window is scored: "first" (the paper's protocol: only its
# first window), or "strided" (windows every half window, each token scored once with up to a
# window of context).
PROTOCOLS = ("first", "strided")


def token_ids(evaluator: Evaluator, text: str) -> tuple[list[int], int]:
    """(the evaluator's ids of ``text`` after a document-boundary token, how many leading ids are
    context only). The boundary is the evaluator's BOS, else its EOS (GPT-2's ``<|endoftext|>`` is
    both): the first token is scored as the start of a document, and the boundary is not scored."""
    ids = evaluator.tokenizer(text, add_special_tokens=False)["input_ids"]
    boundary = evaluator.tokenizer.bos_token_id
    if boundary is None:
        boundary = evaluator.tokenizer.eos_token_id
    return ([boundary] if boundary is not None else []) + list(ids), int(boundary is not None)


def scored_windows(length: int, context: int, max_length: int, protocol: str) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of the windows that score positions ``context`` to
    ``length - 1`` of an id sequence, each position once (a position needs one before it in its window)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown gen-PPL protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    first = max(context, 1)
    if protocol == "first" or length <= max_length:
        return [(0, min(length, max_length), first)] if min(length, max_length) > first else []
    windows, scored_to, stride = [], first, max(1, max_length // 2)
    for start in range(0, length, stride):
        end = min(start + max_length, length)
        if end > scored_to:
            windows.append((start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == length:
            break
    return windows


@torch.no_grad()
def nll_sum(evaluator: Evaluator, texts: list[str], protocol: str = "first") -> tuple[float, int]:
    """(sum of the evaluator's NLL in nats, number of scored tokens) over ``texts``, each a document
    read after a boundary token (:func:`token_ids`), scored by ``protocol`` (:data:`PROTOCOLS`)."""
    device = next(evaluator.model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids, context = token_ids(evaluator, text)
        for start, end, scored_from in scored_windows(len(ids), context, evaluator.max_length, protocol):
            window = torch.tensor(ids[start:end], device=device)[None]
            log_probs = evaluator.model(window).logits[0, :-1].double().log_softmax(-1)
            picked = log_probs.gather(-1, window[0, 1:, None])[scored_from - start - 1:]
            total -= picked.sum().item()
            count += picked.numel()
    return total, count


def generative_perplexity(evaluator: Evaluator, texts: list[str], protocol: str = "first") -> float:
    """``exp`` of the mean NLL per scored token over all ``texts`` (token-weighted)."""
    total, count = nll_sum(evaluator, texts, protocol)
    return perplexity(total / count) if count else float("nan")


def split_documents(ids: list[int], eos_id: int | None) -> list[list[int]]:
    """A sample's ids (after its BOS) cut at each EOS into documents; empty ones dropped."""
    documents, current = [], []
    for token in ids:
        if token == eos_id:
            if current:
                documents.append(current)
            current = []
        else:
            current.append(token)
    if current:
        documents.append(current)
    return documents


def unigram_entropy(tokens: Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token frequencies: tokens [N, L]."""
    return float(unigram_entropies(tokens.cpu().numpy()).mean())


def eval_samplers(choice: str, arch: str) -> list[str]:
    """The samplers ``--eval-sampler`` names for a model of ``arch`` (MDLM has one: ancestral)."""
    if arch != "pgm":
        return ["ancestral"]
    return ["uniform", "binomial"] if choice == "both" else [choice]


def sample_quality(model, num: int, steps: int, generator: torch.Generator, decode,
                   evaluator: Evaluator | None = None, sampler: str = "uniform",
                   protocol: str = "first", source: MarkovSource | None = None) -> tuple[dict[str, float], list[str]]:
    """Sample ``num`` sequences in ``steps`` steps with ``sampler`` (``pgm_dist.sampling.generate``);
    returns ({sampling_steps, sampling_tokens_per_s, entropy[, gen_ppl with an evaluator][, the exact
    NLL under a synthetic ``source``: nll, nll_low, nll_high, source_entropy, nll_gap, invalid]}, texts).
    decode: token ids (list) -> text. Generative perplexity scores each document of a sample (cut at
    the model's EOS, which decoding would drop, gluing documents) by ``protocol``."""

    device = next(model.parameters()).device
    start = time.perf_counter()
    tokens = generate(model, num, steps, generator=generator, mode=sampler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    texts = [decode(row.tolist()) for row in tokens]
    values = {"sampling_steps": steps, "sampling_tokens_per_s": tokens.numel() / seconds,
              "entropy": unigram_entropy(tokens)}
    if evaluator is not None:
        eos = model.config.eos_id
        documents = [decode(doc) for row in tokens for doc in split_documents(row[1:].tolist(), eos)]
        values["gen_ppl"] = generative_perplexity(evaluator, documents, protocol)
    if source is not None:
        values.update(exact_sample_quality(source, tokens.cpu().numpy()))
    return values, texts
