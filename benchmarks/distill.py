"""Teacher vs SDTT student: generative perplexity, unigram entropy and sampling speed per
step count, measured in one run on the built-in corpus.

1. builds the built-in corpus (cached by the builder), trains a teacher for ``--teacher-train-steps``
   (``pgm_dist/train.py``) and distils it for ``--rounds`` rounds from ``--start-steps K``
   (``pgm_dist/distill.py``, 2 teacher steps per student step: the final student samples in
   K / 2^rounds steps);
2. trains its own evaluator, since none can be downloaded here: a small GPT-2 (``transformers``)
   with a byte-level BPE (``tokenizers``) on decoded blocks of the same corpus's training split,
   saved as a Hugging Face folder that ``pgm_dist.evaluation.gen_ppl.load_evaluator`` reads;
3. samples both models (EMA weights) at K, K/2, K/4, K/8 ... steps and scores the samples with
   ``pgm_dist.evaluation.gen_ppl.sample_quality``; held-out blocks scored the same way give the reference.

Teacher, student and evaluator are cached under ``--cache`` in folders named by a hash of their
settings, so a re-run with the same options only samples and scores. The goal check (the
student at K/4 beats the teacher at K/4 in gen-PPL, with entropy within 5% of the teacher's at
K, at ~4x the speed of the teacher at K) is printed as measured facts; nothing fails on it.
The CPU defaults take ~15 minutes on 2 cores; a GPU run at larger budgets:
``--device cuda --teacher-train-steps 5000 --round-steps 1000 --batch 64 --samples 128``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# noqa: E402
from pgm_dist.checkpoints.format import complete_checkpoints
from pgm_dist.checkpoints.load import load_model

# noqa: E402
from pgm_dist.common.cli import default_device
from pgm_dist.data.builder import BuildSettings, build  # noqa: E402
from pgm_dist.data.loader import read_samples  # noqa: E402
from pgm_dist.data.shards import DatasetMeta, expand_sources  # noqa: E402
from pgm_dist.data.tokenizer import Tokenizer  # noqa: E402
from pgm_dist.evaluation.gen_ppl import generative_perplexity, load_evaluator, sample_quality, unigram_entropy

  # noqa: E402

EVAL_BOS = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="runs/bench_distill", help="folder of the cached teacher, student and evaluator")
    p.add_argument("--data", default="data_shards/bench_distill", help="data folder (built here if missing)")
    p.add_argument("--vocab-size", type=int, default=1024, help="corpus tokenizer's vocabulary")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block (and per sample)")
    p.add_argument("--model", default="pgm-tiny", help="teacher preset")
    p.add_argument("--teacher-train-steps", type=int, default=300, help="teacher's optimizer steps")
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--start-steps", type=int, default=64, help="K: the teacher's sampling steps (a power of two)")
    p.add_argument("--rounds", type=int, default=2, help="distillation rounds: the student samples in K / 2^rounds")
    p.add_argument("--round-steps", type=int, default=50, help="optimizer steps per round")
    p.add_argument("--distill-lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=16, help="global batch of teacher training and distillation")
    p.add_argument("--eval-train-blocks", type=int, default=8192, help="training blocks the evaluator reads")
    p.add_argument("--eval-vocab", type=int, default=2048, help="evaluator's byte-level BPE vocabulary")
    p.add_argument("--eval-train-steps", type=int, default=400, help="evaluator's optimizer steps")
    p.add_argument("--eval-batch", type=int, default=16, help="evaluator's windows per step")
    p.add_argument("--eval-context", type=int, default=256, help="evaluator's window (n_positions)")
    p.add_argument("--eval-width", type=int, default=128, help="evaluator's n_embd (n_head = width / 32)")
    p.add_argument("--eval-layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=32, help="sequences sampled per (model, step count)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling runs per cell (the fastest is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device(),
                   help="device of sampling and scoring (training picks its own)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every stage")
    args = p.parse_args(argv)
    k = args.start_steps
    if k < 2 or k & (k - 1):
        p.error(f"--start-steps must be a power of two >= 2, got {k}")
    if not 1 <= args.rounds or k >> args.rounds < 1:
        p.error(f"--rounds must be in [1, log2(--start-steps)], got {args.rounds}")
    if args.eval_width % 32:
        p.error("--eval-width must be a multiple of 32")
    return args


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_script(script: str, args: list[str], log: Path, threads: int) -> None:
    """``python SCRIPT ARGS`` (one process, the engine's own single-rank setup), output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, script, "--no-progress", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{script} failed ({done.returncode}); its output: {log}\n{log.read_text()[-3000:]}")


def finished(run: Path, steps: int) -> bool:
    done = complete_checkpoints(run / "checkpoints")
    return bool(done) and done[-1].name == f"step_{steps:08d}"


def train_runs(args, data: Path, data_key: dict) -> tuple[Path, Path]:
    """(teacher run folder, student run folder), trained unless cached."""
    budget = ["--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "0", "--sample-steps", "2",
              "--num-samples", "1", "--global-batch", str(args.batch), "--micro-batch", str(args.batch),
              "--seed", str(args.seed), "--data", str(data), "--ds_config", "ds_configs/zero2.json"]
    teacher_key = dict(data_key, model=args.model, steps=args.teacher_train_steps, lr=args.teacher_lr,
                       batch=args.batch, seed=args.seed)
    teacher = Path(args.cache) / f"teacher-{key(teacher_key)}"
    if not finished(teacher, args.teacher_train_steps):
        print(f"training the teacher ({args.model}, {args.teacher_train_steps} steps) into {teacher} ...", flush=True)
        start = time.perf_counter()
        run_script("pgm_dist/train.py", [*budget, "--model", args.model, "--out", str(teacher), "--max-steps",
                                         str(args.teacher_train_steps), "--lr", str(args.teacher_lr)],
                   teacher / "train.log", args.threads)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    student_key = dict(teacher=teacher_key, start=args.start_steps, rounds=args.rounds, steps=args.round_steps,
                       lr=args.distill_lr)
    student = Path(args.cache) / f"student-{key(student_key)}"
    if not finished(student, args.rounds * args.round_steps):
        print(f"distilling for {args.rounds} rounds of {args.round_steps} steps from K={args.start_steps} "
              f"into {student} ...", flush=True)
        start = time.perf_counter()
        run_script("pgm_dist/distill.py", [*budget, "--teacher", str(teacher), "--out", str(student),
                                           "--start-steps", str(args.start_steps), "--teacher-steps", "2",
                                           "--rounds", str(args.rounds), "--round-steps", str(args.round_steps),
                                           "--min-steps", "1", "--lr", str(args.distill_lr),
                                           "--eval-samples", "1"],
                   student / "distill.log", args.threads)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return teacher, student


def decoded_blocks(data: Path, split: str, count: int, seed: int) -> list[str]:
    """``count`` blocks of ``split`` drawn at random across all its shards, decoded to text."""
    meta = DatasetMeta.load(data)
    blocks = [b for url in expand_sources(str(data / f"{split}-*.tar")) for b in read_samples(url, meta.seq_len)]
    random.Random(seed).shuffle(blocks)
    tokenizer = Tokenizer(data / "tokenizer.model")
    return [tokenizer.decode(b.tolist()) for b in blocks[:count]]


def train_evaluator(args, data: Path, data_key: dict) -> Path:
    """A GPT-2 trained on decoded training blocks, saved with its tokenizer (cached)."""
    from tokenizers import Tokenizer as BPE
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    settings = dict(data_key, blocks=args.eval_train_blocks, vocab=args.eval_vocab, steps=args.eval_train_steps,
                    batch=args.eval_batch, context=args.eval_context, width=args.eval_width,
                    layers=args.eval_layers, seed=args.seed)
    out = Path(args.cache) / f"evaluator-{key(settings)}"
    if (out / "config.json").is_file():
        return out
    print(f"training the evaluator (GPT-2 {args.eval_layers}x{args.eval_width}, {args.eval_train_steps} steps) "
          f"into {out} ...", flush=True)
    start = time.perf_counter()
    texts = decoded_blocks(data, "train", args.eval_train_blocks, args.seed)
    bpe = BPE(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=args.eval_vocab, special_tokens=[EVAL_BOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EVAL_BOS, eos_token=EVAL_BOS)
    # One stream, each block after a BOS as gen_ppl scores a sample; windows are drawn from it.
    bos = tokenizer.bos_token_id
    stream = torch.tensor([i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
                           for i in [bos, *ids]])
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=args.eval_context, n_embd=args.eval_width,
                        n_layer=args.eval_layers, n_head=args.eval_width // 32, bos_token_id=bos, eos_token_id=bos)
    model = GPT2LMHeadModel(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warmup = max(1, args.eval_train_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.eval_train_steps):
        starts = torch.randint(0, len(stream) - args.eval_context, (args.eval_batch,), generator=generator)
        batch = torch.stack([stream[s:s + args.eval_context] for s in starts.tolist()]).to(args.device)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    print(f"  {time.perf_counter() - start:.0f} s, final training loss {loss.item():.3f} "
          f"({len(stream):,} ids in {len(texts)} blocks)", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    model.cpu().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # only a finished evaluator is ever reused
    return out


def measure(model, steps: int, args, decode, evaluator) -> dict:
    """gen_ppl and entropy of ``--samples`` sequences; tokens/s: the fastest of ``--repeats`` runs."""
    values, _ = sample_quality(model, args.samples, steps, torch.Generator(args.device).manual_seed(args.seed),
                               decode, evaluator)
    for r in range(1, args.repeats):
        again, _ = sample_quality(model, args.samples, steps,
                                  torch.Generator(args.device).manual_seed(args.seed + r), decode)
        values["sampling_tokens_per_s"] = max(values["sampling_tokens_per_s"], again["sampling_tokens_per_s"])
    return values


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    data = Path(args.data)
    build(data, None, BuildSettings(vocab_size=args.vocab_size, seq_len=args.seq_len), progress=False,
          log=lambda msg: print(msg, flush=True))
    data_key = dict(data=str(data.resolve()), vocab=args.vocab_size, seq_len=args.seq_len)
    teacher_run, student_run = train_runs(args, data, data_key)
    evaluator = load_evaluator(train_evaluator(args, data, data_key), args.device)

    teacher, student = load_model(teacher_run, args.device), load_model(student_run, args.device)
    decode = teacher.tokenizer.decode
    k = args.start_steps
    step_counts = [k >> i for i in range(max(args.rounds, 2) + 2) if k >> i >= 1]
    for loaded in (teacher, student):  # warm-up at the timed batch: the first call of a shape compiles kernels
        sample_quality(loaded.model, args.samples, 2, torch.Generator(args.device).manual_seed(0), decode)
    rows = []
    for steps in step_counts:  # teacher and student side by side, so that load changes hit both alike
        for name, loaded in (("teacher", teacher), (f"student r{args.rounds}", student)):
            rows.append(dict(model=name, **measure(loaded.model, steps, args, decode, evaluator)))
            print(f"  {name} at {steps} steps: {rows[-1]}", flush=True)
    held_out = decoded_blocks(data, "val", args.samples, args.seed)
    val_ids = [torch.tensor(teacher.tokenizer.encode(text)) for text in held_out if text]  # rows of any length
    reference = dict(gen_ppl=generative_perplexity(evaluator, held_out), entropy=unigram_entropy(val_ids))

    def cell(name, steps):
        return next(r for r in rows if r["model"].startswith(name) and r["sampling_steps"] == steps)

    base = cell("teacher", k)["sampling_tokens_per_s"]
    print(f"\ncorpus: built-in, vocab {args.vocab_size}, L {args.seq_len}; teacher {args.model} "
          f"{args.teacher_train_steps} steps; student: {args.rounds} rounds x {args.round_steps} steps from K={k}; "
          f"{args.samples} samples per cell; device {args.device}")
    print(f"evaluator: GPT-2 {args.eval_layers}x{args.eval_width}, BPE {args.eval_vocab}, "
          f"{args.eval_train_steps} steps; held-out blocks: gen-PPL {reference['gen_ppl']:.1f}, "
          f"entropy {reference['entropy']:.3f}\n")
    print("| model | steps | gen-PPL | entropy (nats) | tokens/s | speed vs teacher@K |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['sampling_steps']} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | "
              f"{r['sampling_tokens_per_s']:.0f} | {r['sampling_tokens_per_s'] / base:.2f}x |")
    quarter = k // 4
    if quarter >= 1:
        s, t, t_k = cell("student", quarter), cell("teacher", quarter), cell("teacher", k)
        drift = abs(s["entropy"] - t_k["entropy"]) / t_k["entropy"]
        print(f"\ngoal check at K/4 = {quarter} steps (measured, not enforced):")
        print(f"- gen-PPL: student {s['gen_ppl']:.1f} vs teacher {t['gen_ppl']:.1f} at {quarter} steps: "
              f"{'lower' if s['gen_ppl'] < t['gen_ppl'] else 'NOT lower'}")
        print(f"- entropy: student {s['entropy']:.3f} vs teacher at {k} steps {t_k['entropy']:.3f}: "
              f"{100 * drift:.1f}% apart ({'within' if drift <= 0.05 else 'NOT within'} 5%)")
        print(f"- speed: student at {quarter} steps {s['sampling_tokens_per_s'] / base:.2f}x the teacher at {k} "
              f"steps (goal ~4x)")
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")
    return rows


if __name__ == "__main__":
    main()
