"""ZeRO-3 end to end (CPU, gloo, 2 ranks, fp32): the same training as ZeRO-2, an EMA kept on each
rank's partition that equals the EMA of whole parameters, exact and cross-stage resumes, export.

Five short runs, shared by the tests that read runs: a straight ZeRO-2 run of 12 steps (the
reference, with the dense loss: the others' fused output projection + cross-entropy, whose
gradients are made in the forward pass inside ZeRO-3's gathered module, must equal it); a
ZeRO-3 run stopped at step 6 and resumed to 12; a ZeRO-3 run resumed from the ZeRO-2 run's
step-6 checkpoint (EMA decay 0 from there, so its EMA is its raw weights); a ZeRO-2 run resumed
from the ZeRO-3 run's step-6 checkpoint. This file is also the launcher's script of the
unequal-evaluation test (``__main__``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pgm_dist.models import build_model, count_parameters
from pgm_dist.models.config import ModelConfig
from tests.helpers.training import REPO, run_train, scalars

STEPS = 12
COMMON = ["--log-every", "1", "--eval-every", "0", "--ckpt-every", "6", "--global-batch", "8", "--micro-batch", "4",
          "--eval-batches", "2", "--sample-steps", "4", "--num-samples", "2", "--warmup-steps", "2",
          "--ema-decay", "0.5"]


def ckpt(out, step: int):
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    common = ["--data", str(data), *COMMON]
    out = {name: root / name for name in ("zero2", "zero3", "z2_to_z3", "z3_to_z2")}
    # The reference takes the dense loss (whole logits, plain autograd); every other run the fused one.
    run_train([*common, "--ds_config", "ds_configs/zero2.json", "--out", str(out["zero2"]),
               "--max-steps", str(STEPS), "--loss-chunk", "0"], ranks=2)
    first = run_train([*common, "--ds_config", "ds_configs/zero3.json", "--out", str(out["zero3"]),
                       "--max-steps", "6"], ranks=2)
    # The stage-crossing resumes start from copies of the step-6 checkpoints (their universal
    # conversions are written beside them), before the ZeRO-3 run goes on past step 6.
    sources = {}
    for name in ("zero2", "zero3"):
        sources[name] = root / f"{name}_step6" / ckpt(out[name], 6).name
        shutil.copytree(ckpt(out[name], 6), sources[name])
    # Activation checkpointing and a loss chunk that does not divide the micro-batch's tokens change
    # what is kept for backward, not the numbers: the resumed half still equals ZeRO-2's.
    resumed = run_train([*common, "--ds_config", "ds_configs/zero3.json", "--out", str(out["zero3"]),
                         "--max-steps", str(STEPS), "--activation-checkpointing", "--loss-chunk", "100"], ranks=2)
    crossed = {
        "z2_to_z3": run_train([*common, "--ds_config", "ds_configs/zero3.json", "--out", str(out["z2_to_z3"]),
                               "--resume", str(sources["zero2"]), "--max-steps", str(STEPS), "--ema-decay", "0"],
                              ranks=2),
        "z3_to_z2": run_train([*common, "--ds_config", "ds_configs/zero2.json", "--out", str(out["z3_to_z2"]),
                               "--resume", str(sources["zero3"]), "--max-steps", str(STEPS)], ranks=2),
    }
    return {"out": out, "sources": sources, "first": first, "resumed": resumed, **crossed}


def losses(out) -> dict[int, float]:
    return scalars(out / "tb")["train/loss"]


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_zero3_trains_as_zero2_and_resumes_exactly(runs):
    """Steps 1-6 of the first ZeRO-3 run and 7-12 after its exact resume equal the ZeRO-2 run's
    losses; the end-of-run NELBO (EMA weights) and the whole EMA file equal ZeRO-2's, whose EMA
    is updated on whole parameters (the EMA decay 0.5 keeps every update's weight visible)."""
    out = runs["out"]
    reference, zero3 = losses(out["zero2"]), losses(out["zero3"])
    assert sorted(reference) == list(range(1, STEPS + 1)) and sorted(zero3) == list(range(1, STEPS + 1))
    assert "ZeRO-3" in runs["first"].stdout and "resumed from" in runs["resumed"].stdout
    assert not (ckpt(out["zero3"], 6).parent / "step_00000006_universal").exists()  # same layout: no conversion
    for step in range(1, STEPS + 1):
        assert zero3[step] == pytest.approx(reference[step], abs=1e-5), step
    assert reference[STEPS] < reference[1] - 0.05  # it trained: the comparison is not of constants
    nelbo = {name: scalars(out[name] / "tb")["val/nelbo"][STEPS] for name in ("zero2", "zero3")}
    assert nelbo["zero3"] == pytest.approx(nelbo["zero2"], abs=1e-5)
    ema = {name: load_file(str(ckpt(out[name], STEPS) / "ema.safetensors")) for name in ("zero2", "zero3")}
    assert_close_weights(ema["zero3"], ema["zero2"], atol=1e-5)
    # The resumed half's samples were drawn by both ranks (ZeRO-3 forwards are collective) and logged.
    assert "--- sample 1" in runs["resumed"].stdout


@pytest.mark.parametrize("name,source", [("z2_to_z3", "zero2"), ("z3_to_z2", "zero3")])
def test_resume_across_zero_stages(runs, name, source):
    """A ZeRO-2 checkpoint resumed under ZeRO-3 and the other way (through DeepSpeed's universal
    checkpoint): steps 7-12 equal the straight ZeRO-2 run's, and the ZeRO-2 run resumed from ZeRO-3
    ends with the straight run's EMA (so the ZeRO-3 checkpoint held the whole EMA)."""
    out = runs["out"]
    assert "resumed from" in runs[name].stdout
    assert (runs["sources"][source].parent / "step_00000006_universal" / "UNIVERSAL_COMPLETE").is_file()
    reference, resumed = losses(out["zero2"]), losses(out[name])
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    if name == "z3_to_z2":
        assert_close_weights(load_file(str(ckpt(out[name], STEPS) / "ema.safetensors")),
                             load_file(str(ckpt(out["zero2"], STEPS) / "ema.safetensors")), atol=1e-5)


def test_export_of_zero3_checkpoint_equals_consolidated_weights(runs, tmp_path):
    """The ZeRO-3 run resumed with EMA decay 0 has an EMA equal to its raw weights: the export of its
    last checkpoint must equal DeepSpeed's own consolidation of the ZeRO-3 shards (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = ckpt(runs["out"]["z2_to_z3"], STEPS)
    assert json.loads((checkpoint / "pgm_state.json").read_text())["zero_stage"] == 3
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "pgm_dist.export", "--ckpt", str(checkpoint), "--out", str(export)],
                   cwd=REPO, check=True, capture_output=True)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    exported = load_file(str(export / "model.safetensors"))
    assert_close_weights(exported, {k: v.float() for k, v in consolidated.items()}, atol=0)
    # ... and they are the trained weights, not the initial ones of the step-6 checkpoint it resumed from
    before = load_file(str(runs["sources"]["zero2"] / "ema.safetensors"))
    assert max((exported[k] - before[k]).abs().max().item() for k in before) > 1e-4


def test_zero3_model_state_memory_per_rank_is_half_of_one_rank(runs, data):
    """Per-rank parameter + optimizer bytes with 2 ZeRO-3 ranks, from the partitions' sizes, are half
    of one rank's: 4 bytes per parameter (fp32), 4 for the optimizer's fp32 master copy and 8 for
    Adam's two moments, over the whole parameter count."""
    meta = json.loads((data / "meta.json").read_text())
    config = ModelConfig.preset("pgm-tiny", vocab_size=meta["vocab_size"], seq_len=meta["seq_len"])
    n = count_parameters(build_model(config))
    one_rank = (4 + 4 + 2 * 4) * n
    memory = json.loads((runs["out"]["zero3"] / "config.json").read_text())["model_state_bytes_per_rank"]
    assert memory["params"] + memory["optimizer"] == pytest.approx(one_rank / 2, rel=0.01)
    assert memory["grads"] == memory["params"] and memory["params"] == pytest.approx(4 * n / 2, rel=0.01)
    assert memory["total"] == memory["params"] + memory["grads"] + memory["optimizer"]
    zero2 = json.loads((runs["out"]["zero2"] / "config.json").read_text())["model_state_bytes_per_rank"]
    assert zero2["params"] == 4 * n  # ZeRO-2 keeps whole parameters on every rank
    assert "model states per rank" in runs["first"].stdout


def test_evaluation_with_unequal_batch_counts_per_rank(data, tmp_path):
    """Rank 0 holds 3 validation batches, rank 1 two (a split that does not divide evenly): under
    ZeRO-3, whose forwards are collective, evaluation must neither hang nor count the filler passes
    that keep the ranks in step: its NELBO equals ZeRO-2's on the same batches and weights."""
    done = run_train(["--data", str(data), "--out", str(tmp_path), "--global-batch", "8", "--micro-batch", "4"],
                     ranks=2, script="tests/scripts/zero3_unequal_batches.py", env={"PYTHONPATH": str(REPO)},
                     timeout=240)
    values = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("NELBO "))
    assert values.keys() == {"2", "3"}
    assert float(values["3"]) == pytest.approx(float(values["2"]), abs=1e-6)
