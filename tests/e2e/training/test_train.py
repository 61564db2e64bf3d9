"""End-to-end tests of ``deepspeed pgm_dist/train.py`` on the built-in corpus (CPU, gloo)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pgm_dist.data.builder import BuildSettings, build
from pgm_dist.data.documents import default_corpus_paths
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.engine import lr_lambda
from tests.helpers.training import REPO, module_weights, run_train, scalars, text_tags

SHORT = ["--eval-batches", "2", "--sample-steps", "4", "--num-samples", "2", "--micro-batch", "4"]


@pytest.fixture(scope="session")
def pulse_runs(data, tmp_path_factory):
    """The main command, for a handful of steps, with one rank and with two."""
    runs = {}
    for ranks in (1, 2):
        out = tmp_path_factory.mktemp(f"pulse{ranks}")
        run_train(["--ds_config", "ds_configs/zero2.json", "--data", str(data), "--out", str(out),
                   "--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--sample-every", "3",
                   "--ckpt-every", "3", "--global-batch", "8", *SHORT], ranks=ranks if ranks > 1 else None)
        runs[ranks] = out
    return runs


@pytest.mark.parametrize("ranks", [1, 2])
def test_pulse_writes_finite_tensorboard_scalars(pulse_runs, ranks):
    out = pulse_runs[ranks]
    values = scalars(out / "tb")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "val/nelbo", "val/ppl", "perf/tokens_per_s",
                "perf/step_time_s", "perf/data_wait_frac", "perf/model_tflops_per_s", "data/skipped_shards",
                "run/world_size", "run/restarts", "by_tokens/train/loss"):
        assert tag in values, tag
        assert all(math.isfinite(v) for v in values[tag].values()), tag
    assert sorted(values["train/loss"]) == [2, 4, 6]
    assert values["run/world_size"][6] == ranks
    assert values["by_tokens/train/loss"].keys() == {2 * 8 * 64, 4 * 8 * 64, 6 * 8 * 64}
    assert values["val/ppl"][6] == pytest.approx(math.exp(values["val/nelbo"][6]), rel=1e-4)
    assert not any(tag.startswith(("gpu/", "perf/mfu")) for tag in values)  # no GPU, no peak: absent
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(text_tags(out / "tb"))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == ranks and config["batch"]["accumulation"] == 8 // (4 * ranks)
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == ["step_00000003", "step_00000006"]


def test_export_matches_checkpoint_and_zero_to_fp32_reproduces_raw_weights(pulse_runs, data, tmp_path):
    ckpt = pulse_runs[2] / "checkpoints" / "step_00000006"
    export = tmp_path / "export"
    assert subprocess.run([sys.executable, "-m", "pgm_dist.export", "--ckpt", str(ckpt), "--out", str(export)],
                          cwd=REPO).returncode == 0
    reports = [subprocess.run([sys.executable, "-m", "pgm_dist.evaluate", "--model", str(m), "--data", str(data),
                               "--batches", "3"], cwd=REPO, capture_output=True, text=True, check=True).stdout
               for m in (export, ckpt)]
    nelbo = [next(line for line in r.splitlines() if line.startswith("NELBO")) for r in reports]
    assert nelbo[0] == nelbo[1]
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(v, load_file(str(export / "model.safetensors"))[k]) for k, v in ema.items())

    # The script DeepSpeed copies beside the checkpoints, used as a module (its CLI needs huggingface_hub).
    spec = importlib.util.spec_from_file_location("zero_to_fp32", ckpt.parent / "zero_to_fp32.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    consolidated = script.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    raw = module_weights(ckpt)
    assert consolidated.keys() == raw.keys()
    for name, tensor in raw.items():
        torch.testing.assert_close(consolidated[name], tensor.float(), atol=0, rtol=0)
    assert any(not torch.equal(raw[k].float(), ema[k]) for k in raw)  # EMA is not the raw weights

    sampled = subprocess.run([sys.executable, "-m", "pgm_dist.sample", "--model", str(export), "--num", "2",
                              "--steps", "4", "--prompt", "import os", "--seed", "3"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert sampled.count("--- sample") == 2 and sampled.count("\nimport os") == 2


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_loss_decreases_on_the_builtin_corpus(data, tmp_path, preset):
    run_train(["--data", str(data), "--out", str(tmp_path), "--model", preset, "--max-steps", "200",
               "--log-every", "10", "--eval-every", "0", "--ckpt-every", "0", "--warmup-steps", "20",
               "--global-batch", "8", "--micro-batch", "8", "--eval-batches", "2", "--sample-steps", "4",
               "--num-samples", "1"])
    loss = scalars(tmp_path / "tb")["train/loss"]
    first, last = loss[10], (loss[180] + loss[190] + loss[200]) / 3
    assert last < first - 1.0, (first, last)


def test_exact_resume_two_ranks_zero2_fp32(data, tmp_path):
    common = ["--data", str(data), "--max-steps", "8", "--log-every", "1", "--eval-every", "0",
              "--ckpt-every", "4", "--global-batch", "8", "--loader-workers", "2", *SHORT]
    run_train([*common, "--out", str(tmp_path / "straight")], ranks=2)
    run_train([*common[:-len(SHORT)], *SHORT, "--out", str(tmp_path / "split"), "--max-steps", "4"], ranks=2)
    resumed = run_train([*common, "--out", str(tmp_path / "split")], ranks=2)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    straight, split = scalars(tmp_path / "straight" / "tb"), scalars(tmp_path / "split" / "tb")
    for step in range(5, 9):
        assert split["train/loss"][step] == pytest.approx(straight["train/loss"][step], abs=1e-5)
    assert split["run/restarts"][8] == 1
    # The end-of-run evaluation uses the EMA weights: restoring the EMA is what makes these equal.
    assert split["val/nelbo"][8] == pytest.approx(straight["val/nelbo"][8], abs=1e-5)
    for read in (module_weights, lambda ckpt: load_file(str(ckpt / "ema.safetensors"))):
        a = read(tmp_path / "straight" / "checkpoints" / "step_00000008")
        b = read(tmp_path / "split" / "checkpoints" / "step_00000008")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def zero_optimizer_state(checkpoint) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """A ZeRO-1/2 checkpoint's fp32 weights and Adam moments, put together from every rank's flat
    partition: ({"fp32" | "exp_avg" | "exp_avg_sq": {name: tensor}}, Adam's step count). One
    parameter group, flattened in ``param_shapes`` order; only the last partition is padded."""
    shapes = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["param_shapes"]
    assert len(shapes) == 1
    files = sorted(checkpoint.glob("zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(re.match(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    flat, steps = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}, set()
    for file in files:
        shard = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        fp32 = shard["single_partition_of_fp32_groups"][0]  # saved without the padding
        adam = shard["base_optimizer_state"]["state"][0]
        flat["fp32"].append(fp32)
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key].append(adam[key][:fp32.numel()])
        steps.add(int(adam["step"]))
    assert len(steps) == 1
    state = {}
    for key, parts in flat.items():
        vector, offset, state[key] = torch.cat(parts), 0, {}
        for name, shape in shapes[0].items():
            state[key][name] = vector[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        assert offset == vector.numel()
    return state, steps.pop()


@pytest.mark.parametrize("before,after", [(("zero2", 2), ("zero2", 1)), (("zero1", 2), ("zero2", 2))])
def test_elastic_resume_through_universal_checkpoint(data, tmp_path, before, after):
    """Another world size or ZeRO stage resumes through DeepSpeed's universal checkpoint. The
    conversion must keep the fp32 weights and Adam's moments exactly, and the resumed engine must
    hold them, Adam's step count, the schedule and the EMA: its first step (13) is checked against
    one AdamW step from the step-12 state, in closed form."""
    common = ["--data", str(data), "--out", str(tmp_path), "--log-every", "1", "--eval-every", "0",
              "--global-batch", "8", *SHORT]
    run_train([*common, "--ds_config", f"ds_configs/{before[0]}.json", "--max-steps", "12", "--ckpt-every", "12"],
              ranks=before[1])
    resumed = run_train([*common, "--ds_config", f"ds_configs/{after[0]}.json", "--max-steps", "13"],
                        ranks=after[1] if after[1] > 1 else None)
    assert "resumed from" in resumed.stdout
    ckpts = tmp_path / "checkpoints"
    universal = ckpts / "step_00000012_universal"
    assert (universal / "UNIVERSAL_COMPLETE").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == after[1]

    old, old_step = zero_optimizer_state(ckpts / "step_00000012")
    new, new_step = zero_optimizer_state(ckpts / "step_00000013")
    raw12, raw13 = module_weights(ckpts / "step_00000012"), module_weights(ckpts / "step_00000013")
    assert old.keys() == new.keys() and old["fp32"].keys() == raw12.keys()
    for name in raw12:
        assert torch.equal(old["fp32"][name], raw12[name]) and torch.equal(new["fp32"][name], raw13[name])
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # what the conversion wrote for the new layout
            assert torch.equal(torch.load(universal / "zero" / name / f"{key}.pt", weights_only=False)["param"],
                               old[key][name]), (key, name)
    assert (old_step, new_step) == (12, 13)

    cfg = TrainConfig(max_steps=13)  # the run's schedule: the defaults (warm-up over 50 steps)
    lr = scalars(tmp_path / "tb")["train/lr"]
    assert lr[13] == pytest.approx(cfg.lr * lr_lambda(cfg)(13), rel=1e-6)  # float32; logged after step 13's update
    step_lr = cfg.lr * lr_lambda(cfg)(12)  # the rate step 13 used
    b1, b2, eps = cfg.beta1, cfg.beta2, 1e-8
    ema12 = load_file(str(ckpts / "step_00000012" / "ema.safetensors"))
    ema13 = load_file(str(ckpts / "step_00000013" / "ema.safetensors"))
    ema_weight = 1 - min(cfg.ema_decay, (1 + 12) / (10 + 12))  # the 13th EMA update
    for name in raw12:
        m12, v12, w12 = (old[k][name].double() for k in ("exp_avg", "exp_avg_sq", "fp32"))
        m13, v13, w13 = (new[k][name].double() for k in ("exp_avg", "exp_avg_sq", "fp32"))
        grad = (m13 - b1 * m12) / (1 - b1)  # the (clipped) gradient of step 13
        torch.testing.assert_close(v13, b2 * v12 + (1 - b2) * grad**2, rtol=1e-4, atol=1e-20)
        denom = (v13 / (1 - b2**13)).sqrt() + eps
        torch.testing.assert_close(w13, w12 - step_lr / (1 - b1**13) * m13 / denom, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ema13[name], ema12[name] + ema_weight * (raw13[name] - ema12[name]),
                                   rtol=0, atol=1e-6)


def test_kill_during_checkpoint_save_resumes_from_previous_complete_one(data, tmp_path):
    common = ["--data", str(data), "--out", str(tmp_path), "--max-steps", "6", "--ckpt-every", "3",
              "--eval-every", "0", "--log-every", "1", "--global-batch", "8", *SHORT]
    crashed = run_train(common, ranks=2, env={"PGM_DIST_FAULT_KILL_IN_SAVE": "6:1"}, check=False)
    assert crashed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000003" / "COMPLETE").is_file()
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    resumed = run_train(common, ranks=2)
    assert "resumed from" in resumed.stdout and "step_00000003 at step 3" in resumed.stdout
    assert (ckpts / "step_00000006" / "COMPLETE").is_file()


def _error(args, tmp_path) -> str:
    done = run_train(args, launcher=False, check=False, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    return done.stderr


def test_user_errors_are_clear_and_raised_before_distributed_work(data, pulse_runs, tmp_path):
    assert "does not exist" in _error(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)], tmp_path)
    assert "not a multiple" in _error(["--data", str(data), "--out", str(tmp_path), "--global-batch", "7"],
                                      tmp_path)
    small_corpus = [default_corpus_paths()[0] / "json", default_corpus_paths()[0] / "email"]
    other = tmp_path / "other_data"
    build(other, small_corpus, BuildSettings(vocab_size=400, seq_len=32, samples_per_shard=16), progress=False,
          log=lambda *_: None)
    assert "holds checkpoints of an earlier run" in _error(["--data", str(data), "--out", str(pulse_runs[1]),
                                                            "--resume", "never"], tmp_path)
    message = _error(["--data", str(other), "--out", str(pulse_runs[1])], tmp_path)
    assert "tokenizer of the data" in message and "does not match" in message
    same_tokenizer = tmp_path / "longer"
    build(same_tokenizer, small_corpus, BuildSettings(seq_len=128, samples_per_shard=16,
                                                      tokenizer=data / "tokenizer.model"),
          progress=False, log=lambda *_: None)
    message = _error(["--data", str(same_tokenizer), "--out", str(pulse_runs[1])], tmp_path)
    assert "holds another model" in message and "seq_len" in message


def test_triton_backend_trains_under_deepspeed_zero1(data, tmp_path):
    """The fused kernels (interpreted on a CPU) inside a real ZeRO-1 engine: finite losses, and a
    first-step loss equal to the reference backend's (same seed, same weights, same batch)."""
    losses = {}
    for backend in ("triton", "reference"):
        out = tmp_path / backend
        run_train(["--ds_config", "ds_configs/zero1.json", "--data", str(data), "--out", str(out),
                   "--attention", backend, "--max-steps", "2", "--log-every", "1", "--eval-every", "0",
                   "--ckpt-every", "0", "--global-batch", "4", "--micro-batch", "4", "--eval-batches", "1",
                   "--sample-steps", "2", "--num-samples", "1"])
        losses[backend] = scalars(out / "tb")["train/loss"]
    for step in (1, 2):
        assert math.isfinite(losses["triton"][step])
        assert losses["triton"][step] == pytest.approx(losses["reference"][step], abs=1e-4)


def test_preemption_signal_saves_at_the_next_step_and_resume_continues(data, tmp_path):
    """SIGUSR2 (SLURM's preemption warning) sets a flag; the run checkpoints at the next step
    boundary and exits cleanly; the next run resumes from that step."""
    args = [sys.executable, "pgm_dist/train.py", "--no-progress", "--data", str(data), "--out", str(tmp_path),
            "--max-steps", "100000", "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1",
            "--global-batch", "8", *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "config.json").exists():  # written once the loop is ready
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    stopped = int(re.search(r"preempted at step (\d+)", output).group(1))
    assert stopped >= 1
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == [f"step_{stopped:08d}"]
    resumed = run_train(args[2:] + ["--max-steps", str(stopped + 2)], launcher=False)
    assert f"at step {stopped}" in resumed.stdout and f"finished at step {stopped + 2}" in resumed.stdout
    assert scalars(tmp_path / "tb")["run/restarts"][stopped + 2] == 1


def test_sigterm_to_the_process_group_then_resume_from_a_path_with_cosine_offload_mdlm(data, tmp_path):
    """One MDLM run (ZeRO-2 with the optimizer offloaded, cosine schedule, a checkpoint every step
    by time only, keep 2, two DataLoader workers) gets SIGTERM sent to its whole process group, as
    SLURM does: the workers must survive it and the run checkpoints and exits cleanly. It resumes
    from an explicit older checkpoint (--resume PATH) and finishes; the export / evaluate / sample
    CLIs then reproduce the run's own evaluation and sampling of the MDLM checkpoint."""
    out = tmp_path / "run"
    args = ["--no-progress", "--model", "mdlm-tiny", "--ds_config", "ds_configs/zero2_offload.json",
            "--data", str(data), "--out", str(out), "--max-steps", "12", "--lr-schedule", "cosine",
            "--warmup-steps", "2", "--min-lr-ratio", "0.1", "--ckpt-every", "0", "--ckpt-minutes", "0.0001",
            "--keep-last", "2", "--loader-workers", "2", "--log-every", "1", "--eval-every", "0",
            "--global-batch", "8", *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "pgm_dist/train.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts / "step_00000003" / "COMPLETE").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    stopped = int(re.search(r"stopped at step (\d+)", output).group(1))  # SIGTERM: saved, not to be requeued
    assert 4 <= stopped < 12
    # Every step was checkpointed by time (--ckpt-every 0), and only the last two were kept.
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{stopped - 1:08d}", f"step_{stopped:08d}"]

    older = ckpts / f"step_{stopped - 1:08d}"
    resumed = run_train([*args[1:], "--resume", str(older)], launcher=False).stdout
    assert f"resumed from {older} at step {stopped - 1}" in resumed and "finished at step 12" in resumed
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000011", "step_00000012"]
    values = scalars(out / "tb")
    assert values["run/restarts"][12] == 1 and sorted(values["train/lr"]) == list(range(1, 13))
    for step, lr in values["train/lr"].items():  # logged after `step` updates: the schedule at `step`
        factor = (step + 1) / 2 if step < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 10))
        assert lr == pytest.approx(1e-3 * factor, rel=1e-6), step

    def cli(module, *cli_args, check=True):
        return subprocess.run([sys.executable, "-m", f"pgm_dist.{module}", *map(str, cli_args)], cwd=REPO,
                              capture_output=True, text=True, check=check)

    export = tmp_path / "export"
    cli("export", "--ckpt", out, "--out", export)
    nelbo = [float(re.search(r"NELBO (\S+)", cli("evaluate", "--model", model, "--data", data, "--batches", 2,
                                                  "--micro-batch", 4).stdout).group(1))
             for model in (export, ckpts / "step_00000012")]
    # The run's end-of-run evaluation: the same batches, seed and EMA weights.
    assert nelbo[0] == nelbo[1] == pytest.approx(values["val/nelbo"][12], abs=2e-6)

    from pgm_dist.checkpoints.load import load_model
    from pgm_dist.sampling import generate

    loaded = load_model(export)
    tokens = generate(loaded.model, 2, 4, generator=torch.Generator().manual_seed(3))
    assert tokens.shape == (2, 64) and (tokens[:, 0] == loaded.config.bos_id).all()
    assert ((tokens >= 0) & (tokens < loaded.config.vocab_size)).all()  # nothing left masked
    sampled = cli("sample", "--model", export, "--num", 2, "--steps", 4, "--seed", 3).stdout
    assert sampled == "".join(f"--- sample {i} ---\n{loaded.tokenizer.decode(row.tolist())}\n"
                              for i, row in enumerate(tokens))
    refused = cli("sample", "--model", export, "--prompt", "import os", check=False)
    assert refused.returncode == 2 and "prompts are supported for PGM models only" in refused.stderr
