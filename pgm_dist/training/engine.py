"""The one training engine: a DeepSpeed ZeRO engine, its optimizer and schedule, the EMA,
and the step logic. It knows nothing of what is being trained: any objective with
``loss(model, tokens, t, generator)``, ``nelbo(...)`` and ``t_min`` (the floor of the noise
levels it draws) runs on it: PGM, MDLM, SDTT.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pgm_dist.common.distributed import DistEnv, all_reduce
from pgm_dist.common.zero import local_values, zero_stage
from pgm_dist.evaluation.nelbo import nelbo_and_perplexity, nelbo_sums
from pgm_dist.objectives import derived_seed, global_sample_indices, low_discrepancy_times, shared_uniform, unpack
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.ema import EMA


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then constant or cosine down to ``min_lr_ratio`` at ``max_steps``."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over this rank's micro-steps, detached, on the device
    grad_norm: float | None
    applied: bool  # False when DeepSpeed skipped a non-finite gradient
    data_wait_s: float


class Engine:
    def __init__(self, model: nn.Module, objective, cfg: TrainConfig, ds_config: dict, env: DistEnv,
                 device: torch.device):
        import deepspeed

        self.objective, self.cfg, self.env, self.device = objective, cfg, env, device
        model = model.to(device)
        if cfg.compile:
            model.compile()  # in place: the state dict keys stay the module's own
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.micro_batch = self.ds.train_micro_batch_size_per_gpu()
        self.accum = self.ds.gradient_accumulation_steps()
        self.global_batch = self.ds.train_batch_size()
        self.stage = zero_stage(ds_config)
        self.ema = EMA(self.module, cfg.ema_decay)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW under DeepSpeed's wrappers (ZeRO 1/2/3 and the bf16 optimizer keep it, over
        their flat fp32 partitions, as ``.optimizer``)."""
        optimizer = self.ds.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        return optimizer

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's model-state memory in bytes, from the sizes of what it holds: its parameters
        (the ZeRO-3 partition, else whole), its gradient partition (ZeRO-2/3: the share it reduces
        into; ZeRO-0/1: whole), and the optimizer's state: the AdamW's parameters (ZeRO's flat fp32
        master partitions) where they are not the module's own storage, plus Adam's two moments of
        their size (allocated at the first step, so counted, not measured, at start)."""
        module_params = list(self.module.parameters())
        params = sum(local_values(p).numel() * local_values(p).element_size() for p in module_params)
        held = {local_values(p).untyped_storage().data_ptr() for p in module_params}
        if self.stage >= 3:  # ZeRO-3 hands its AdamW the flat partitions only for the duration of a step
            masters = list(self.ds.optimizer.fp32_partitioned_groups_flat)
        else:
            masters = [p for group in self.torch_optimizer.param_groups for p in group["params"]]
        master_bytes = sum(p.numel() * p.element_size() for p in masters)
        state = 2 * master_bytes + sum(p.numel() * p.element_size() for p in masters
                                       if p.untyped_storage().data_ptr() not in held)
        element = local_values(module_params[0]).element_size()
        if self.stage >= 3:
            grads = params
        elif self.stage == 2:
            grads = sum(p.numel() for p in masters) * element
        else:
            grads = sum(p.numel() for p in module_params) * element
        return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, batches: Iterator[torch.Tensor], step: int) -> StepResult:
        """One optimizer step over ``accum`` micro-batches of this rank.

        Noise levels ``t`` form the low-discrepancy set over the whole global batch;
        partitions and dropout are seeded from (seed, step, rank, micro-step), so a
        resumed run draws exactly what the uninterrupted one would.
        """
        self.ds.train()
        u = shared_uniform(self.cfg.seed, step)
        losses, data_wait = [], 0.0
        for micro in range(self.accum):
            start = time.perf_counter()
            tokens, extra = unpack(next(batches), self.device)
            data_wait += time.perf_counter() - start
            index = global_sample_indices(self.micro_batch, self.env.rank, self.env.world_size, micro)
            t = low_discrepancy_times(u, index, self.global_batch, self.objective.t_min).to(self.device)
            seed = derived_seed(self.cfg.seed, step, self.env.rank, micro)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(self.device).manual_seed(seed)
            loss = self.objective.loss(self.ds, tokens, t, generator, **extra)
            self.ds.backward(loss)
            self.ds.step()
            losses.append(loss.detach())
        applied = self.ds.was_step_applied()
        if applied:
            self.ema.update(self.module)
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        return StepResult(torch.stack(losses).mean(), norm, applied, data_wait)

    def sample_with_ema(self, sample):
        """``sample(model with the EMA weights)`` on rank 0, and under ZeRO-3 on every rank (its
        forwards are collective: ``sample`` must draw the same on every rank, e.g. from one seeded
        generator). Returns the result on rank 0, None on the others."""
        if not (self.env.is_main or self.ema.partitioned):
            return None
        with self.ema.applied_to(self.module) as model:
            result = sample(model)
        return result if self.env.is_main else None

    def evaluate(self, val_batches, seed: int = 1234) -> tuple[float, float]:
        """Validation NELBO per token and perplexity with the EMA weights, over all ranks."""
        filler = []
        if self.stage >= 3:
            val_batches = list(val_batches)
            filler = self._filler_batches(val_batches)
        with self.ema.applied_to(self.module) as model:
            total = nelbo_sums(model, self.objective, val_batches, self.device, seed, self.env.rank)
            if filler:  # results discarded
                nelbo_sums(model, self.objective, filler, self.device, seed, self.env.rank)
        return nelbo_and_perplexity(all_reduce(total))

    def _filler_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """A ZeRO-3 forward is collective: a rank with fewer validation batches than another (a split
        that does not divide evenly) runs as many discarded passes as it lacks. Agreed before any pass."""
        most = int(all_reduce(torch.tensor(float(len(batches)), device=self.device), "max").item())
        if batches:
            filler = batches[-1]
        else:  # a dummy micro-batch of this run's kind (image runs carry labels)
            config = self.module.config
            filler = torch.full((1, config.seq_len), config.bos_id, dtype=torch.long)
            if config.image_grid is not None:
                filler = (filler, torch.zeros(1, dtype=torch.long))
        return [filler] * (most - len(batches))
