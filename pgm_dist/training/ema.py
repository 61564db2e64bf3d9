"""Exponential moving average of the weights, used for evaluation, sampling and export
(under ZeRO-3 each rank keeps its own partition: see :mod:`pgm_dist.common.zero`)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from pgm_dist.common.zero import _refresh_gathered, full_shape, is_partitioned, local_values, partition_of


class EMA:
    """fp32 shadow weights (this rank's partitions under ZeRO-3); the decay is warmed up as
    ``min(decay, (1 + n) / (10 + n))`` so that short runs are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        params = dict(model.named_parameters())
        self.shadow = {name: local_values(p).detach().float().clone() for name, p in params.items()}
        self.shapes = {name: full_shape(p) for name, p in params.items()}
        self.partitioned = any(is_partitioned(p) for p in params.values())

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart from ``model``'s current weights, warm-up included (as a new EMA would)."""
        for name, p in model.named_parameters():
            self.shadow[name].copy_(local_values(p).detach())
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(local_values(p).detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def whole(self) -> dict[str, torch.Tensor]:
        """The EMA weights by name, whole, on every rank. Under ZeRO-3 a collective (every rank
        calls it) whose result is on the CPU, one parameter at a time on the device; else the shadow."""
        if not self.partitioned:
            return self.shadow
        weights = {}
        for name, part in self.shadow.items():
            pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, part)
            shape = self.shapes[name]
            weights[name] = torch.cat(pieces)[:shape.numel()].view(shape).cpu()
        return weights

    def state_dict(self) -> dict:
        """Whole weights under ``shadow`` (collective under ZeRO-3)."""
        return {"decay": self.decay, "updates": self.updates, "shadow": self.whole()}

    def load_state_dict(self, state: dict) -> None:
        """``state["shadow"]``: whole weights by name (this rank keeps its slice under ZeRO-3)."""
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA weights do not match the model: {sorted(missing)[:5]} ...")
        self.updates = state["updates"]
        rank = dist.get_rank() if self.partitioned else 0
        for name, tensor in state["shadow"].items():
            if tuple(tensor.shape) != tuple(self.shapes[name]):
                raise ValueError(f"EMA weight {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(self.shapes[name])}")
            target = self.shadow[name]
            target.copy_(partition_of(tensor, target.numel(), rank) if self.partitioned else tensor)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (restored exactly afterwards). Under
        ZeRO-3 into this rank's partitions, so every rank enters it (and runs the same forwards)."""
        params = dict(model.named_parameters())
        backup = {name: local_values(p).detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                local_values(p).copy_(self.shadow[name])
        _refresh_gathered(params.values())
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    local_values(p).copy_(backup[name])
            _refresh_gathered(params.values())

