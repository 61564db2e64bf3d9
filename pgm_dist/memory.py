"""``python -m pgm_dist.memory``: per-GPU memory of the model states (bf16 weights and gradients,
fp32 master weights and Adam moments) of each preset under ZeRO-1/2/3, from DeepSpeed's own
estimators, so a config can be picked before asking for nodes.

ZeRO-2 and ZeRO-3 are DeepSpeed's ``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` (no offload). DeepSpeed has no ZeRO-1 estimator: its
column uses the ZeRO-2 estimator's accounting (2 bytes of bf16 weights per parameter, 2 of bf16
gradients, 16 of fp32 gradients, weights and moments) with the bf16 gradients whole on every GPU,
as ZeRO-1 keeps them: ``4 P + 16 P / N``. Activations and temporary buffers come on top.
Parameter counts are exact: each preset is built on the meta device (no memory).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from pgm_dist.common.cli import HelpFormatter, run_cli
from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import IMAGE_PRESETS, PRESETS, ModelConfig

# The paper's OpenWebText setting (GPT-2 tokenizer, 1024 tokens); the vocabulary moves the counts.
DEFAULT_VOCAB, DEFAULT_SEQ_LEN = 50258, 1024
DEFAULT_GPUS = (8, 16, 64)
TEXT_PRESETS = [name for name in PRESETS if name not in IMAGE_PRESETS]


@dataclass(frozen=True)
class ParamCount:
    total: int
    largest_layer: int  # parameters owned directly by one module: what ZeRO-3 gathers at once


def preset_parameters(config: ModelConfig) -> ParamCount:
    with torch.device("meta"):
        model = build_model(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCount(count_parameters(model), largest)


def model_state_bytes(params: ParamCount, stage: int, gpus: int, gpus_per_node: int = 8) -> int:
    """Per-GPU bytes of model states at ZeRO ``stage`` over ``gpus`` GPUs (no offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(gpus, gpus_per_node)
    nodes = gpus // per_node
    if stage == 1:
        return 4 * params.total + int(16 * params.total / gpus)
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(params.total, per_node, nodes, cpu_offload=False)[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params.total, params.largest_layer, per_node, nodes,
                                                     cpu_offload=False, cpu_offload_params=False)[1]
    raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")


def table(presets: list[str], gpus: tuple[int, ...] = DEFAULT_GPUS, vocab_size: int = DEFAULT_VOCAB,
          seq_len: int = DEFAULT_SEQ_LEN) -> str:
    """A markdown table: one row per preset, parameters then GiB per GPU per (stage, GPU count)."""
    columns = [(stage, n) for stage in (1, 2, 3) for n in gpus]
    lines = ["| preset | parameters | " + " | ".join(f"ZeRO-{s} x{n}" for s, n in columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for name in presets:
        params = preset_parameters(ModelConfig.preset(name, vocab_size=vocab_size, seq_len=seq_len))
        cells = [f"{model_state_bytes(params, s, n) / 2**30:.2f}" for s, n in columns]
        lines.append(f"| {name} | {params.total / 1e6:,.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgm_dist.memory", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=TEXT_PRESETS, metavar="PRESET",
                        help="presets to list (default: the text presets)")
    parser.add_argument("--gpus", nargs="+", type=int, default=list(DEFAULT_GPUS),
                        help="total GPU counts, 8 per node (fewer than 8: one node)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    args = parser.parse_args(argv)
    return run_cli(lambda: show(args))


def show(args: argparse.Namespace) -> None:
    unknown = [m for m in args.models if m not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown} (valid: {', '.join(PRESETS)})")
    if any(n < 1 or (n > 8 and n % 8) for n in args.gpus):
        raise ValueError("--gpus: each count must be 1-8 or a multiple of 8 (8 GPUs per node)")
    text = table(args.models, tuple(args.gpus), args.vocab_size, args.seq_len)
    print(f"GiB of model states per GPU (bf16 + fp32 Adam, no offload; V {args.vocab_size:,}, "
          f"L {args.seq_len}); activations come on top\n\n{text}")


if __name__ == "__main__":
    sys.exit(main())
