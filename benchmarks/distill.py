"""SDTT on a source whose likelihood is known: teacher vs distilled student, scored exactly.

The corpus is a random sparse Markov source (``python -m pgm_dist.data build-synthetic``); every
sample is scored by its exact negative log-likelihood under the source (nats per symbol, 95%
bootstrap interval), beside the source's own entropy (the ideal). No evaluator model. K = L - 1
sampling steps reveal one symbol per step.

1. builds the synthetic folder and trains the teacher (``pgm_dist/train.py``) in chunks of
   ``--teacher-chunk`` steps until its sample NLL at K/4 steps is worse than at K steps by more than
   both intervals (nothing to distil otherwise: it stops with a message at ``--teacher-max-steps``);
2. distils it (``pgm_dist/distill.py``, from its EMA weights, 2 teacher steps per student step):
   rounds from K, students at K/2, K/4, K/8;
3. controls: the teacher trained on for as many steps as distillation took, with its own objective
   (extra training is not distillation), and an MDLM of the same width and total depth trained
   for the teacher's whole budget (the paper's baseline);
4. samples every model (EMA weights: the student started from the teacher's EMA) at K, K/2, K/4,
   K/8 steps with both PGM samplers, ``--samples`` sequences per cell, the same random numbers for
   every model of a cell; and measures the teacher in the student's precision (benchmarks/sdtt_teacher.py).

Every trained model is cached under ``--cache`` by its settings: a re-run only samples. On 2 CPU
cores the defaults take about 30 minutes from scratch. The goal (student closes at least half of
the teacher's gap to its K-step NLL at K/4 and K/8, intervals apart, unigram entropy within 2% of
the source's) is printed as measured facts; nothing fails on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdtt_teacher import measure as teacher_precision  # noqa: E402  (benchmarks/, this script's folder)
from sdtt_teacher import table as precision_table  # noqa: E402

from pgm_dist.checkpoints.format import complete_checkpoints  # noqa: E402
from pgm_dist.checkpoints.load import load_model  # noqa: E402
from pgm_dist.data.synthetic import SOURCE_FILE, MarkovSource, SyntheticSettings, build_synthetic  # noqa: E402
from pgm_dist.evaluation.gen_ppl import sample_quality  # noqa: E402

SAMPLERS = ("uniform", "binomial")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="runs/bench_distill", help="folder of the cached models")
    p.add_argument("--data", default="data_shards/bench_synthetic", help="synthetic data folder (built if missing)")
    p.add_argument("--vocab", type=int, default=32, help="symbols of the Markov source")
    p.add_argument("--successors", type=int, default=3, help="likely successors of each state")
    p.add_argument("--seq-len", type=int, default=33, help="BOS + K symbols; K = seq-len - 1 must be a power of 2")
    p.add_argument("--train-sequences", type=int, default=100_000)
    p.add_argument("--model", default="pgm-tiny", help="teacher preset")
    p.add_argument("--mdlm", default="mdlm-tiny", help="the MDLM of the same width and total depth")
    p.add_argument("--batch", type=int, default=64, help="global batch of every training")
    p.add_argument("--lr", type=float, default=1e-3, help="teacher (and MDLM) learning rate")
    p.add_argument("--teacher-chunk", type=int, default=1000, help="teacher steps between gap checks")
    p.add_argument("--teacher-max-steps", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3, help="distillation rounds: students at K/2 ... K/2^rounds")
    p.add_argument("--round-steps", type=int, default=400, help="optimizer steps per round")
    p.add_argument("--distill-lr", type=float, default=3e-4)
    p.add_argument("--samples", type=int, default=256, help="sequences per cell (>= 256 for the goal's intervals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of sampling (training picks its own)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every stage")
    args = p.parse_args(argv)
    k = args.seq_len - 1
    if k < 8 or k & (k - 1):
        p.error(f"--seq-len - 1 must be a power of two >= 8, got {k}")
    if k >> args.rounds < 1:
        p.error(f"--rounds {args.rounds}: K = {k} cannot be halved that often")
    return args


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_script(script: str, args: list[str], log: Path, threads: int) -> float:
    """``python SCRIPT ARGS`` (one process, the engine's own single-rank setup), appended to ``log``;
    returns its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run([sys.executable, script, "--no-progress", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{script} failed ({done.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def trained_to(run: Path) -> int:
    done = complete_checkpoints(run / "checkpoints")
    return int(done[-1].name.split("_")[1]) if done else 0


def train(run: Path, model: str, steps: int, args, data: Path, lr: float) -> float:
    """Train (or go on training) ``run`` to ``steps``; seconds spent (0 when cached)."""
    if trained_to(run) >= steps:
        return 0.0
    return run_script("pgm_dist/train.py", [
        "--data", str(data), "--model", model, "--out", str(run), "--max-steps", str(steps), "--lr", str(lr),
        "--global-batch", str(args.batch), "--micro-batch", str(args.batch), "--eval-every", "0",
        "--eval-batches", "1", "--ckpt-every", "0", "--keep-last", "1", "--sample-steps", "2", "--num-samples", "1",
        "--warmup-steps", "100", "--seed", str(args.seed)], run / "train.log", args.threads)


def cell(model, steps: int, sampler: str, args, source: MarkovSource, decode) -> dict:
    """Exact quality of ``--samples`` sequences; the same generator for every model of a cell."""
    generator = torch.Generator(args.device).manual_seed(args.seed * 1000 + steps)
    values, _ = sample_quality(model, args.samples, steps, generator, decode, sampler=sampler, source=source)
    return values


def teacher_gap(run: Path, args, source: MarkovSource, k: int) -> tuple[dict, dict]:
    loaded = load_model(run, args.device)
    return (cell(loaded.model, k, "uniform", args, source, loaded.tokenizer.decode),
            cell(loaded.model, k // 4, "uniform", args, source, loaded.tokenizer.decode))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    k = args.seq_len - 1
    data = Path(args.data)
    settings = SyntheticSettings(vocab=args.vocab, successors=args.successors, seq_len=args.seq_len,
                                 seed=args.seed, train_sequences=args.train_sequences)
    build_synthetic(data, settings, log=lambda msg: print(msg, flush=True))
    source = MarkovSource.load(data / SOURCE_FILE)
    base = dict(data=vars(settings), batch=args.batch, lr=args.lr, seed=args.seed)
    cache = Path(args.cache)
    seconds = {}

    # 1. the teacher, until sampling at K/4 steps is measurably worse than at K
    teacher = cache / f"teacher-{key(dict(base, model=args.model))}"
    target, seconds["teacher"] = max(args.teacher_chunk, trained_to(teacher)), 0.0
    while True:
        seconds["teacher"] += train(teacher, args.model, target, args, data, args.lr)
        at_k, at_quarter = teacher_gap(teacher, args, source, k)
        gap = at_quarter["nll"] - at_k["nll"]
        print(f"teacher at {trained_to(teacher)} steps: NLL {at_k['nll']:.4f} at K={k} "
              f"[{at_k['nll_low']:.4f}, {at_k['nll_high']:.4f}], {at_quarter['nll']:.4f} at K/4 "
              f"[{at_quarter['nll_low']:.4f}, {at_quarter['nll_high']:.4f}]: gap {gap:+.4f} nats/symbol "
              f"(source entropy {at_k['source_entropy']:.4f})", flush=True)
        if at_quarter["nll_low"] > at_k["nll_high"]:
            break
        if trained_to(teacher) >= args.teacher_max_steps:
            sys.exit(f"no measurable gap between K={k} and K/4={k // 4} steps after {trained_to(teacher)} teacher "
                     "steps: nothing for distillation to close. Train longer (--teacher-max-steps), or use a "
                     "source with stronger dependencies (fewer --successors)")
        target = trained_to(teacher) + args.teacher_chunk
    teacher_steps = trained_to(teacher)
    distill_steps = args.rounds * args.round_steps

    # 2. the student
    student_key = key(dict(base, teacher=teacher.name, at=teacher_steps, rounds=args.rounds,
                           round_steps=args.round_steps, lr=args.distill_lr))
    student = cache / f"student-{student_key}"
    seconds["student"] = 0.0
    if trained_to(student) < distill_steps:
        seconds["student"] = run_script("pgm_dist/distill.py", [
            "--teacher", str(teacher), "--data", str(data), "--out", str(student), "--init-from", "ema",
            "--start-steps", str(k), "--teacher-steps", "2", "--rounds", str(args.rounds), "--round-steps",
            str(args.round_steps), "--min-steps", "1", "--lr", str(args.distill_lr), "--global-batch", str(args.batch),
            "--micro-batch", str(args.batch), "--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "0",
            "--keep-last", "1", "--eval-samples", "8", "--eval-sampler", "uniform", "--sample-steps", "2",
            "--num-samples", "1", "--seed", str(args.seed)], student / "distill.log", args.threads)

    # 3. controls: the teacher trained on as long, and the MDLM with the teacher's whole budget
    extra = cache / f"teacher-extra-{key(dict(base, teacher=teacher.name, at=teacher_steps, extra=distill_steps))}"
    if trained_to(extra) < teacher_steps + distill_steps and not (extra / "checkpoints").exists():
        shutil.copytree(teacher, extra, ignore=shutil.ignore_patterns("tb", "lease.json"))
    seconds["teacher_extra"] = train(extra, args.model, teacher_steps + distill_steps, args, data, args.lr)
    mdlm = cache / f"mdlm-{key(dict(base, model=args.mdlm))}"
    seconds["mdlm"] = train(mdlm, args.mdlm, teacher_steps + distill_steps, args, data, args.lr)

    # 4. the table
    models = {"teacher": load_model(teacher, args.device), "teacher+extra": load_model(extra, args.device),
              "student": load_model(student, args.device)}
    mdlm_model = load_model(mdlm, args.device)
    decode = models["teacher"].tokenizer.decode
    counts = [k >> i for i in range(4)]
    for loaded in (*models.values(), mdlm_model):  # warm-up
        cell(loaded.model, 2, "uniform", args, source, decode)
    rows = []
    for steps in counts:
        for sampler in SAMPLERS:
            for name, loaded in models.items():
                values = cell(loaded.model, steps, sampler, args, source, decode)
                rows.append(dict(model=name, sampler=sampler, **values))
        rows.append(dict(model=f"MDLM ({args.mdlm})", sampler="ancestral",
                         **cell(mdlm_model.model, steps, "uniform", args, source, decode)))
    precision = teacher_precision(batch=args.batch, device=args.device, model=load_model(teacher, args.device).model)

    ideal = rows[0]["source_entropy"]
    print(f"\nsource: order-1 Markov, {args.vocab} symbols, {args.successors} likely successors, L {args.seq_len} "
          f"(K = {k}); entropy {ideal:.4f} nats/symbol, unigram entropy of its sequences "
          f"{rows[0]['source_unigram_entropy']:.4f}")
    print(f"teacher {args.model}: {teacher_steps} steps; student: {args.rounds} rounds x {args.round_steps} steps "
          f"from K={k}; controls: the teacher + {distill_steps} steps, {args.mdlm} {teacher_steps + distill_steps} "
          f"steps; batch {args.batch}; {args.samples} samples per cell; {args.device}\n")
    print("| model | sampler | steps | NLL (nats/symbol) | 95% CI | gap to source | unigram entropy | tokens/s |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['sampling_steps']} | {r['nll']:.4f} | "
              f"{r['nll_low']:.4f}-{r['nll_high']:.4f} | {r['nll_gap']:+.4f} | {r['entropy']:.4f} | "
              f"{r['sampling_tokens_per_s']:,.0f} |")

    def get(model, sampler, steps):
        return next(r for r in rows if r["model"] == model and r["sampler"] == sampler and r["sampling_steps"] == steps)

    print("\ngoal check (measured, not enforced): the student closes >= 1/2 of the teacher's gap to its own "
          "K-step NLL, intervals apart, unigram entropy within 2% of the source's "
          f"({rows[0]['source_unigram_entropy']:.4f})")
    goal = {}
    for sampler in SAMPLERS:
        for steps in (k // 4, k // 8):
            t, s, t_k = get("teacher", sampler, steps), get("student", sampler, steps), get("teacher", sampler, k)
            gap = t["nll"] - t_k["nll"]
            closed = (t["nll"] - s["nll"]) / gap if gap > 0 else float("nan")
            apart = s["nll_high"] < t["nll_low"]
            drift = abs(s["entropy"] - s["source_unigram_entropy"]) / s["source_unigram_entropy"]
            met = closed >= 0.5 and apart and drift <= 0.02
            goal[(sampler, steps)] = met
            print(f"- {sampler}, {steps} steps: teacher {t['nll']:.4f}, student {s['nll']:.4f}, teacher at K "
                  f"{t_k['nll']:.4f}: closed {100 * closed:.0f}% of the gap "
                  f"({'apart' if apart else 'intervals overlap'}); "
                  f"unigram entropy {100 * drift:.1f}% from the source's -> {'met' if met else 'NOT met'}")
    m_k = get(f"MDLM ({args.mdlm})", "ancestral", k)
    fast = [r for r in rows if r["model"] == "student" and r["sampler"] == "uniform" and r["nll"] <= m_k["nll"]]
    if fast:
        best = min(fast, key=lambda r: r["sampling_steps"])
        print(f"- speed: the student at {best['sampling_steps']} steps (NLL {best['nll']:.4f} <= MDLM's "
              f"{m_k['nll']:.4f} at {k}) samples {best['sampling_tokens_per_s'] / m_k['sampling_tokens_per_s']:.1f}x "
              "as many tokens/s as the MDLM at K")
    else:
        print(f"- speed: no student cell reaches the MDLM's NLL at K ({m_k['nll']:.4f})")
    print(f"\nteacher precision ({args.model}, the distillation batch):\n"
          + precision_table(precision, f"batch {args.batch}, L {args.seq_len}, {args.device}"))
    print(f"\ntraining seconds (0: cached): {json.dumps({n: round(s) for n, s in seconds.items()})}; "
          f"wall time {time.perf_counter() - wall:.0f} s")
    return {"rows": rows, "goal": goal, "precision": precision, "teacher_steps": teacher_steps}


if __name__ == "__main__":
    main()
