"""Tiny models for tests."""
import torch

from pgm_dist import ModelConfig, build_model


def randomized_model(preset: str, vocab_size: int = 61, seq_len: int = 48, seed: int = 0, **overrides):
    """A tiny model whose zero-initialised layers (adaLN gates, output) are made non-zero,
    so that every path of the network actually carries information."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.preset(preset, vocab_size=vocab_size, seq_len=seq_len, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
