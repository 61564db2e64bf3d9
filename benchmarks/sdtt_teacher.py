"""The SDTT teacher in the student's precision: one distillation micro-step (teacher target with
``--teacher-steps`` ancestral steps, student forward and backward) with the teacher in fp32 beside
the teacher under bf16 autocast (its weights stay fp32), measured in one run, and the bf16
target's error against the fp32 one on the same draws (KL(fp32 target || bf16 target) per masked
position).

    python benchmarks/sdtt_teacher.py                          # CPU: pgm-tiny, batch 8, L 128
    python benchmarks/sdtt_teacher.py --device cuda --preset pgm-small --batch 8 --seq-len 1024

On a GPU the student computes in bf16 too (autocast here; DeepSpeed's bf16 in training), as
``deepspeed pgm_dist/distill.py`` does with ``--teacher-precision auto``.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgm_dist.distillation.objective import SDTTConfig, SDTTObjective, kl_forward, noisy_input, teacher_target  # noqa: E402
from pgm_dist.models import build_model  # noqa: E402
from pgm_dist.models.config import ModelConfig  # noqa: E402
from pgm_dist.objectives import partition_groups  # noqa: E402


def measure(preset: str = "pgm-tiny", batch: int = 8, seq_len: int = 128, vocab_size: int = 1024,
            device: str = "cpu", repeats: int = 10, teacher_steps: int = 2, seed: int = 0,
            model: torch.nn.Module | None = None) -> dict:
    """{fp32_step_s, bf16_step_s, speedup, target_kl_mean, target_kl_max} (median step times).
    ``model``: a trained student (and first teacher); default: ``preset`` with random weights
    everywhere (a fresh model's zero-initialised output would give uniform targets in any precision)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    if model is None:
        config = ModelConfig.preset(preset, vocab_size=vocab_size, seq_len=seq_len)
        student = build_model(config).to(dev)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:
        student, config = model.to(dev).train(), model.config
        vocab_size, seq_len = config.vocab_size, config.seq_len
    objective = SDTTObjective.from_student(student, SDTTConfig(start_steps=64 * teacher_steps,
                                                               teacher_steps=teacher_steps, min_steps=1))
    objective.teacher.to(dev)
    tokens = torch.randint(0, vocab_size, (batch, seq_len), device=dev)
    t = torch.linspace(0.05, 0.95, batch, device=dev)
    student_precision = (torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda"
                         else contextlib.nullcontext())

    def step() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        with student_precision:
            loss = objective.loss(student, tokens, t, torch.Generator(dev).manual_seed(seed))
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    times = {}
    for autocast in (False, True):
        objective.teacher_autocast = autocast
        step()  # warm-up
        times[autocast] = statistics.median(step() for _ in range(repeats))
    masked = partition_groups(t, seq_len, objective.schedule, torch.Generator(dev).manual_seed(1))
    noisy = noisy_input(tokens, masked, config)
    targets = {}
    for autocast in (False, True):
        objective.teacher_autocast = autocast
        with objective._teacher_precision(dev):
            target, _ = teacher_target(objective.teacher, noisy, masked, t, objective.dt, teacher_steps,
                                       objective.schedule, objective.t_min, torch.Generator(dev).manual_seed(2))
        targets[autocast] = target.float()[masked]
    kl = kl_forward(targets[True], targets[False])  # KL(fp32 || bf16)
    return {"fp32_step_s": times[False], "bf16_step_s": times[True], "speedup": times[False] / times[True],
            "target_kl_mean": kl.mean().item(), "target_kl_max": kl.max().item()}


def table(result: dict, label: str) -> str:
    return "\n".join([
        "| teacher | distillation micro-step (s) | speed vs fp32 |",
        "| --- | ---: | ---: |",
        f"| fp32 | {result['fp32_step_s']:.4f} | 1.00x |",
        f"| bf16 autocast | {result['bf16_step_s']:.4f} | {result['speedup']:.2f}x |",
        "",
        f"{label}; bf16 target vs fp32 target on the same draws: KL per masked position mean "
        f"{result['target_kl_mean']:.2e}, max {result['target_kl_max']:.2e} nats"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pgm-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--teacher-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    result = measure(args.preset, args.batch, args.seq_len, args.vocab_size, args.device, args.repeats,
                     args.teacher_steps)
    print(table(result, f"{args.preset}, batch {args.batch}, L {args.seq_len}, V {args.vocab_size}, "
                        f"{args.teacher_steps} teacher steps, {args.device}"))


if __name__ == "__main__":
    main()
