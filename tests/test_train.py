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
from tests.train_helpers import REPO, module_weights, run_train, scalars, text_tags

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
    a = module_weights(tmp_path / "straight" / "checkpoints" / "step_00000008")
    b = module_weights(tmp_path / "split" / "checkpoints" / "step_00000008")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("before,after", [(("zero2", 2), ("zero2", 1)), (("zero1", 2), ("zero2", 2))])
def test_elastic_resume_through_universal_checkpoint(data, tmp_path, before, after):
    common = ["--data", str(data), "--out", str(tmp_path), "--log-every", "1", "--eval-every", "0",
              "--global-batch", "8", *SHORT]
    run_train([*common, "--ds_config", f"ds_configs/{before[0]}.json", "--max-steps", "12", "--ckpt-every", "12"],
              ranks=before[1])
    saved = module_weights(tmp_path / "checkpoints" / "step_00000012")
    resumed = run_train([*common, "--ds_config", f"ds_configs/{after[0]}.json", "--max-steps", "15"],
                        ranks=after[1] if after[1] > 1 else None)
    assert "resumed from" in resumed.stdout
    assert (tmp_path / "checkpoints" / "step_00000012_universal" / "UNIVERSAL_COMPLETE").is_file()
    loss = scalars(tmp_path / "tb")["train/loss"]
    before_loss = sum(loss[s] for s in (10, 11, 12)) / 3
    after_loss = sum(loss[s] for s in (13, 14, 15)) / 3
    # Training goes on from where it was (still improving), not from a fresh model's loss.
    assert after_loss < before_loss + 0.2 and after_loss < loss[1] - 0.5, (loss[1], before_loss, after_loss)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["world_size"] == after[1]
    assert len(saved) == len(module_weights(tmp_path / "checkpoints" / "step_00000015"))


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
    assert "ZeRO-3 is not supported" in _error(["--data", str(data), "--out", str(tmp_path),
                                                "--ds_config", "ds_configs/zero3.json"], tmp_path)
    small_corpus = [default_corpus_paths()[0] / "json", default_corpus_paths()[0] / "email"]
    other = tmp_path / "other_data"
    build(other, small_corpus, BuildSettings(vocab_size=400, seq_len=32, samples_per_shard=16), progress=False,
          log=lambda *_: None)
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
