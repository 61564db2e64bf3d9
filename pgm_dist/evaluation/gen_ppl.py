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


def token_ids(evaluator: Evaluator, text: str) -> list[int]:
    """The evaluator's ids of ``text``, after its BOS when it has one (so that the first
    token is scored too)."""
    ids = evaluator.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = evaluator.tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


@torch.no_grad()
def nll_sum(evaluator: Evaluator, texts: list[str]) -> tuple[float, int]:
    """(sum of the evaluator's NLL in nats, number of predicted tokens) over ``texts``.

    Each text is read in windows of ``max_length`` ids; within a window every id but the
    first is predicted from those before it."""
    device = next(evaluator.model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = token_ids(evaluator, text)
        for start in range(0, len(ids), evaluator.max_length):
            window = torch.tensor(ids[start:start + evaluator.max_length], device=device)[None]
            if window.shape[1] < 2:
                continue
            log_probs = evaluator.model(window).logits[0, :-1].double().log_softmax(-1)
            total -= log_probs.gather(-1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    return total, count


def generative_perplexity(evaluator: Evaluator, texts: list[str]) -> float:
    """``exp`` of the mean NLL per predicted token over all ``texts`` (token-weighted)."""
    total, count = nll_sum(evaluator, texts)
    return perplexity(total / count) if count else float("nan")


def unigram_entropy(tokens: Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token frequencies: tokens [N, L]."""
    entropies = []
    for row in tokens:
        counts = torch.bincount(row.flatten().cpu()).double()
        p = counts[counts > 0] / row.numel()
        entropies.append(-(p * p.log()).sum().item())
    return sum(entropies) / len(entropies)


def sample_quality(model, num: int, steps: int, generator: torch.Generator, decode,
                   evaluator: Evaluator | None = None) -> tuple[dict[str, float], list[str]]:
    """Sample ``num`` sequences in ``steps`` steps (``pgm_dist.sampling.generate``); returns
    ({sampling_steps, sampling_tokens_per_s, entropy[, gen_ppl with an evaluator]}, texts).
    decode: token ids (list) -> text."""

    device = next(model.parameters()).device
    start = time.perf_counter()
    tokens = generate(model, num, steps, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    texts = [decode(row.tolist()) for row in tokens]
    values = {"sampling_steps": steps, "sampling_tokens_per_s": tokens.numel() / seconds,
              "entropy": unigram_entropy(tokens)}
    if evaluator is not None:
        values["gen_ppl"] = generative_perplexity(evaluator, texts)
    return values, texts
