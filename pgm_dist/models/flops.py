"""Model FLOPs per token, counting only the attention pairs a model may use.

Training FLOPs per token = 3 x forward (backward = 2 x forward):
- matmuls: ``2 * N`` per token for the per-token linear weights ``N`` (every
  ``nn.Linear`` except the adaLN modulation, which runs once per sequence);
- attention: ``4 * d`` per (query, visible key) pair and layer (``QK^T`` and ``AV``).

Visible keys per query: MDLM all ``L``. PGM, with ``t`` uniform and group-1 rate
``~t``: same-group keys in the encoder ``E[t^2 + (1-t)^2] L = 2L/3``; other-group
keys in GroupSwap and every decoder block ``E[2t(1-t)] L = L/3``. ``dense=True``
counts all ``L`` keys everywhere: what the dense-mask backends actually compute.
"""
from __future__ import annotations

from torch import nn

from pgm_dist.common.zero import full_numel
from pgm_dist.models.config import ModelConfig

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def per_token_linear_params(model: nn.Module) -> int:
    return sum(full_numel(m.weight) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and "modulation" not in name)


def attention_key_counts(config: ModelConfig, dense: bool = False) -> float:
    """Sum over attention layers of the keys one query sees, on average."""
    L = config.seq_len
    if config.arch == "mdlm":
        return config.n_enc * L
    enc_keys, dec_keys = (L, L) if dense else (2 * L / 3, L / 3)
    return config.n_enc * enc_keys + (config.n_dec + 1) * dec_keys


def training_flops_per_token(model: nn.Module, config: ModelConfig, dense: bool = False) -> float:
    forward = 2 * per_token_linear_params(model) + 4 * config.d_model * attention_key_counts(config, dense)
    return 3 * forward


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU from its name, else None (CPUs included)."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)
