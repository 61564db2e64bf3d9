"""Samplers: PGM (uniform, binomial, naive) and the MDLM baseline (section 5 and 6).

Tokens are drawn with float64 Gumbel-max, after optional temperature and nucleus
(top-p) filtering. The same ``generator`` gives the same samples.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from pgm_dist.objectives import LogLinearSchedule

SAMPLING_MODES = ("uniform", "binomial", "naive")
Prompt = Sequence[tuple[int, int]] | Sequence[Sequence[tuple[int, int]]]
# callback(step, query_positions [B, Q], logits [B, Q, V], valid [B, Q])
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_categorical(logits: Tensor, generator: torch.Generator | None = None,
                       temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Draw one token per row of ``logits [..., V]`` by float64 Gumbel-max."""
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (logits + gumbel).argmax(dim=-1)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _parse_prompt(prompt: Prompt | None, batch_size: int) -> list[list[tuple[int, int]]]:
    if not prompt:
        return [[] for _ in range(batch_size)]
    if all(len(pair) == 2 and all(isinstance(x, int) for x in pair) for pair in prompt):
        return [list(map(tuple, prompt)) for _ in range(batch_size)]
    if len(prompt) != batch_size:
        raise ValueError(f"got {len(prompt)} prompts for a batch of {batch_size}")
    return [list(map(tuple, p)) for p in prompt]


def _initial_state(config, batch_size: int, prompt: Prompt | None, device) -> tuple[Tensor, Tensor]:
    """Tokens [B, L] and known [B, L]: BOS at position 0, then the prompt tokens."""
    L = config.seq_len
    tokens = torch.zeros(batch_size, L, dtype=torch.long, device=device)
    known = torch.zeros(batch_size, L, dtype=torch.bool, device=device)
    tokens[:, 0], known[:, 0] = config.bos_id, True
    for b, pairs in enumerate(_parse_prompt(prompt, batch_size)):
        for position, token in pairs:
            if not 1 <= position < L:
                raise ValueError(f"prompt position {position} is outside [1, {L}): position 0 holds BOS")
            if not 0 <= token < config.vocab_size:
                raise ValueError(f"prompt token {token} is outside the vocabulary [0, {config.vocab_size})")
            tokens[b, position], known[b, position] = token, True
    return tokens, known


def _reveal_counts(mode: str, step: int, steps: int, remaining: Tensor, total_unknown: Tensor,
                   schedule: LogLinearSchedule, generator) -> Tensor:
    """How many positions each sequence reveals at this step: LongTensor[B]."""
    if step == steps - 1:
        return remaining
    if mode == "binomial":
        t, s = 1 - step / steps, 1 - (step + 1) / steps
        p = torch.full(remaining.shape, schedule.reveal_probability(t, s), device=remaining.device)
        return torch.binomial(remaining.float(), p, generator=generator).long()
    # near-equal chunks of each sequence's unknown positions
    done = total_unknown - remaining
    return (total_unknown * (step + 1)) // steps - done


def _gather_rows(order: Tensor, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """``order[b, start[b] : start[b] + count[b]]`` padded to max(count): (positions, valid)."""
    width = int(count.max())
    offsets = torch.arange(width, device=order.device)
    valid = offsets[None] < count[:, None]
    index = (start[:, None] + offsets[None]).clamp_max(order.shape[1] - 1)
    return order.gather(1, index), valid


@torch.no_grad()
def sample_pgm(model, batch_size: int, steps: int, *, mode: str = "uniform", prompt: Prompt | None = None,
               temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
               labels: Tensor | None = None, callback: StepCallback | None = None) -> Tensor:
    """Generate ``LongTensor[B, L]`` with a PGM in ``steps`` steps.

    mode: ``uniform`` (the efficient sampler: near-equal chunks of a random order,
    the network running on the clean tokens and the chunk's queries only),
    ``binomial`` (reveals ``Binomial(remaining, p_step)`` tokens per sequence and
    step, as MDLM does), or ``naive`` (the uniform schedule computed at full length
    with ``groups = unknown``; the same logits as ``uniform``).
    prompt: (position, token) pairs shared by the batch, or one list per sequence.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; valid: {', '.join(SAMPLING_MODES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config, schedule = model.config, LogLinearSchedule()
    device = _device(model)
    with _eval_mode(model):
        tokens, known = _initial_state(config, batch_size, prompt, device)
        # One random order per sequence, drawn once: the known positions first.
        scores = torch.rand(known.shape, generator=generator, device=device).masked_fill(known, -1.0)
        order = scores.argsort(dim=1)
        clean_count = known.sum(dim=1)
        total_unknown = config.seq_len - clean_count
        for step in range(steps):
            remaining = config.seq_len - clean_count
            reveal = _reveal_counts(mode, step, steps, remaining, total_unknown, schedule, generator)
            if int(reveal.max()) == 0:
                continue
            query_positions, valid = _gather_rows(order, clean_count, reveal)
            if mode == "naive":
                logits = model(tokens, ~known, labels=labels).gather(
                    1, query_positions[..., None].expand(-1, -1, config.vocab_size))
            else:
                clean_positions, _ = _gather_rows(order, torch.zeros_like(clean_count), clean_count)
                same_count = bool((clean_count == clean_count[0]).all())
                logits = model.predict(tokens.gather(1, clean_positions), clean_positions, query_positions,
                                       clean_lengths=None if same_count else clean_count, labels=labels)
            if callback is not None:
                callback(step, query_positions, logits, valid)
            drawn = sample_categorical(logits, generator, temperature, top_p)
            rows = torch.arange(batch_size, device=device)[:, None].expand_as(query_positions)
            tokens[rows[valid], query_positions[valid]] = drawn[valid]
            known[rows[valid], query_positions[valid]] = True
            clean_count = clean_count + reveal
    return tokens


@torch.no_grad()
def sample_mdlm(model, batch_size: int, steps: int, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, labels: Tensor | None = None) -> Tensor:
    """Ancestral MDLM sampling from BOS at position 0 and MASK elsewhere: ``LongTensor[B, L]``.

    Which positions a step reveals does not depend on the logits, so it is drawn first
    and the network runs only for steps that reveal something: one forward pass per
    such step. This is the reference's "reuse the logits when a step reveals nothing"
    (its network input is unchanged until a step reveals a token), without the pass
    it computes before its first reveal.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config, schedule = model.config, LogLinearSchedule()
    device = _device(model)
    with _eval_mode(model):
        x = torch.full((batch_size, config.seq_len), config.mask_id, dtype=torch.long, device=device)
        x[:, 0] = config.bos_id
        for step in range(steps):
            masked = x == config.mask_id
            if step == steps - 1:
                reveal = masked
            else:
                p = schedule.reveal_probability(1 - step / steps, 1 - (step + 1) / steps)
                reveal = masked & (torch.rand(x.shape, generator=generator, device=device) < p)
            if reveal.any():
                x[reveal] = sample_categorical(model(x, labels=labels)[reveal], generator, temperature, top_p)
    return x


def generate(model, batch_size: int, steps: int, *, prompt: Prompt | None = None, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, mode: str = "uniform") -> Tensor:
    """Sample with the sampler of the model's architecture: a PGM with ``mode`` (see
    :func:`sample_pgm`; default uniform), MDLM with its ancestral sampler (whose reveals are
    per-position, like the PGM's binomial mode; ``mode`` is not used)."""
    if model.config.arch == "pgm":
        return sample_pgm(model, batch_size, steps, mode=mode, prompt=prompt, temperature=temperature, top_p=top_p,
                          generator=generator)
    if prompt:
        raise ValueError("prompts are supported for PGM models only")
    return sample_mdlm(model, batch_size, steps, temperature=temperature, top_p=top_p, generator=generator)
