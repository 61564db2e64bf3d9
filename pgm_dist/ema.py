"""Exponential moving average of the weights, used for evaluation, sampling and export."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """fp32 shadow weights; the decay is warmed up as ``min(decay, (1 + n) / (10 + n))``
    so that short runs are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart from ``model``'s current weights, warm-up included (as a new EMA would)."""
        for name, p in model.named_parameters():
            self.shadow[name].copy_(p.detach())
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA weights do not match the model: {sorted(missing)[:5]} ...")
        self.updates = state["updates"]
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (restored exactly afterwards)."""
        params = dict(model.named_parameters())
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])
