"""SDTT distillation on the training engine: ``deepspeed pgm_dist/distill.py`` end to end and
resumed in the middle of a round, and the generative-perplexity evaluator (CPU)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from pgm_dist import distill, evaluate
from pgm_dist.checkpoints.format import load_ema_weights
from pgm_dist.checkpoints.load import load_model
from pgm_dist.evaluation.gen_ppl import generative_perplexity, load_evaluator, nll_sum, split_documents, unigram_entropy
from pgm_dist.sampling import generate
from tests.helpers.training import module_weights, run_train, scalars

transformers = pytest.importorskip("transformers", reason="the [eval] extra (transformers) is not installed")

TEXTS = ["def main():\n    return 0\n", "import os\nprint(os.getcwd())", "x = [i * i for i in range(10)]"]


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    """A tiny random GPT-2 with a byte-level BPE tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("evaluator")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=8, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def reference_gen_ppl(evaluator_dir, texts: list[str]) -> float:
    """The paper's protocol by the model's own loss: the shifted cross-entropy of each text's first
    window of 8 ids (the document boundary <|endoftext|>, then the text), token-weighted."""
    model = transformers.AutoModelForCausalLM.from_pretrained(evaluator_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(evaluator_dir)
    total, count = 0.0, 0
    for text in texts:
        window = torch.tensor(([tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False))[:8])[None]
        if window.shape[1] > 1:
            with torch.no_grad():
                total += model(window, labels=window).loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(total / count)


def test_generative_perplexity_equals_transformers_loss_and_entropy_closed_form(evaluator_dir):
    evaluator = load_evaluator(evaluator_dir)
    assert evaluator.max_length == 8
    assert all(len(evaluator.tokenizer.encode(text)) > 8 for text in TEXTS)  # several windows per text
    assert generative_perplexity(evaluator, TEXTS) == pytest.approx(reference_gen_ppl(evaluator_dir, TEXTS), rel=1e-5)
    # strided windows score every token once; a text within one window scores the same either way
    ids = [len(evaluator.tokenizer.encode(text)) for text in TEXTS]
    assert nll_sum(evaluator, TEXTS, "strided")[1] == sum(ids) and nll_sum(evaluator, TEXTS, "first")[1] == 7 * 3
    short = ["x = 1"]
    assert len(evaluator.tokenizer.encode(short[0])) < 8
    assert nll_sum(evaluator, short, "strided") == pytest.approx(nll_sum(evaluator, short, "first"))
    assert generative_perplexity(evaluator, short) == pytest.approx(reference_gen_ppl(evaluator_dir, short), rel=1e-5)
    # Entropy of each row's token frequencies: {a, a, b, b} -> log 2, {c, c, c, c} -> 0.
    assert unigram_entropy(torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]])) == pytest.approx(math.log(2) / 2)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A pgm-tiny checkpoint trained for 3 steps (one process) at a high learning rate, so that
    its predictions are far from the zero-initialised output's uniform ones."""
    out = tmp_path_factory.mktemp("teacher")
    run_train(["--data", str(data), "--out", str(out), "--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0",
               "--global-batch", "4",
               "--micro-batch", "4", "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "1",
               "--sample-steps", "2", "--num-samples", "1"], launcher=False)
    return out / "checkpoints" / "step_00000003"


def test_evaluate_cli_scores_samples_under_the_eval_model(data, teacher, evaluator_dir, capsys):
    assert evaluate.main(["--model", str(teacher), "--data", str(data), "--batches", "1", "--eval-model",
                          str(evaluator_dir), "--samples", "2", "--steps", "4", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    reported = {sampler: float(value) for sampler, value in
                re.findall(r"(\w+) sampler \([0-9,]+ tokens/s\): generative perplexity ([0-9.]+)", out)}
    assert reported.keys() == {"uniform", "binomial"} and "(first-window protocol)" in out
    loaded = load_model(teacher)
    for sampler, value in reported.items():
        tokens = generate(loaded.model, 2, 4, generator=torch.Generator().manual_seed(5), mode=sampler)
        # each document of a sample (cut at EOS, which decoding drops) is scored after a boundary
        documents = [loaded.tokenizer.decode(doc) for row in tokens
                     for doc in split_documents(row[1:].tolist(), loaded.config.eos_id)]
        assert value == pytest.approx(reference_gen_ppl(evaluator_dir, documents), abs=1e-4), sampler


def test_user_errors_are_clear_before_distributed_work(data, teacher, tmp_path, capsys):
    base = ["--data", str(data), "--out", str(tmp_path / "x"), "--round-steps", "3", "--start-steps", "8",
            "--min-steps", "2"]
    for extra, message in [
        (["--teacher", str(tmp_path)], "neither an export"),
        (["--teacher", str(teacher), "--eval-model", str(tmp_path / "none")], "--eval-model"),
        (["--teacher", str(teacher), "--eval-model", str(tmp_path)], "cannot be loaded"),
    ]:
        assert distill.main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main([*base, "--teacher", str(teacher), "--start-steps", "12"])
    assert "power of two times the teacher steps" in capsys.readouterr().err


def adam_states(checkpoint) -> list[dict]:
    """Adam's per-parameter states (``step``, ``exp_avg``, ``exp_avg_sq``) of every rank's ZeRO shard."""
    states = []
    for shard in sorted(checkpoint.glob("*optim_states.pt")):
        saved = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        states += list(saved["state"].values()) if isinstance(saved, dict) else list(saved)
    assert states, checkpoint
    return states


def test_two_rounds_resume_mid_round_two_with_the_round_two_teacher(data, teacher, evaluator_dir, tmp_path):
    """2 ranks, ZeRO-2, fp32: round 0 = steps 1-3 (4-step students), round 1 = steps 4-6 (2-step).
    The split run stops after step 4 and resumes; losses, teacher and weights match the straight run."""
    common = ["--ds_config", "ds_configs/zero2.json", "--teacher", str(teacher), "--data", str(data),
              "--start-steps", "8", "--round-steps", "3", "--rounds", "2", "--min-steps", "2",
              "--global-batch", "4", "--micro-batch", "2", "--log-every", "1", "--eval-every", "0",
              "--ckpt-every", "3", "--eval-batches", "1", "--sample-steps", "2", "--num-samples", "1",
              "--eval-samples", "2", "--eval-model", str(evaluator_dir), "--lr", "1e-2", "--warmup-steps", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train([*common, "--out", str(straight)], ranks=2, script="pgm_dist/distill.py")
    run_train([*common, "--out", str(split), "--max-steps", "4"], ranks=2, script="pgm_dist/distill.py")
    resumed = run_train([*common, "--out", str(split)], ranks=2, script="pgm_dist/distill.py")
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout

    a, b = scalars(straight / "tb"), scalars(split / "tb")
    assert a["distill/round"] == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert a["distill/sampling_steps"] == {1: 4, 2: 4, 3: 4, 4: 2, 5: 2, 6: 2}
    assert a["distill/loss"] == a["train/loss"]
    # The first step of each round starts with teacher == student (a small loss: one step of 2 dt
    # against two of dt); the later ones, at --lr 1e-2, are far apart: a wrong teacher or dt after
    # the resume would show at 1e-5.
    loss = a["train/loss"]
    assert max(loss[1], loss[4]) < 1e-3 and min(loss[2], loss[3], loss[5], loss[6]) > 1e-2, loss
    for step in range(1, 7):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], abs=1e-5), step
    # End of each round: the EMA student sampled at its step count, scored by the evaluator.
    for sampler in ("uniform", "binomial"):  # --eval-sampler both (the default)
        assert a[f"eval/{sampler}/sampling_steps"] == {3: 4, 6: 2} == b[f"eval/{sampler}/sampling_steps"]
        for tag in (f"eval/{sampler}/gen_ppl", f"eval/{sampler}/sampling_tokens_per_s"):
            assert a[tag].keys() == {3, 6} and all(math.isfinite(v) and v > 0 for v in a[tag].values()), tag
        assert all(0 < v <= math.log(64) for v in a[f"eval/{sampler}/entropy"].values())

    # The teacher of round 1 is the student's raw weights at step 3, in every later checkpoint
    # of both runs (the split run's step 4 was saved by the first part, step 6 by the resumed one).
    boundary = module_weights(straight / "checkpoints" / "step_00000003")
    original = module_weights(teacher)  # the first teacher: the student started from these raw weights
    for ckpt in (straight / "checkpoints" / "step_00000003", straight / "checkpoints" / "step_00000006",
                 split / "checkpoints" / "step_00000004", split / "checkpoints" / "step_00000006"):
        round_teacher = load_file(str(ckpt / "teacher.safetensors"))
        assert round_teacher.keys() == boundary.keys()
        for name, tensor in boundary.items():
            torch.testing.assert_close(round_teacher[name], tensor.float(), atol=0, rtol=0)
    assert any(not torch.equal(boundary[k], original[k]) for k in boundary)
    # Without --reset-optimizer / --reset-ema both continue across the boundary.
    assert all(int(state["step"]) == 3 and state["exp_avg"].abs().sum() > 0
               for state in adam_states(straight / "checkpoints" / "step_00000003"))
    assert torch.load(straight / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                      weights_only=False)["ema_updates"] == 3
    for name, tensor in module_weights(straight / "checkpoints" / "step_00000006").items():
        torch.testing.assert_close(module_weights(split / "checkpoints" / "step_00000006")[name], tensor,
                                   atol=1e-6, rtol=0)


def test_reset_optimizer_and_ema_at_the_boundary_then_an_elastic_resume(data, teacher, tmp_path):
    """ZeRO-1, --reset-optimizer --reset-ema. One process runs round 0 (steps 1-3) and stops at
    the boundary: its step-3 checkpoint holds a fresh Adam and an EMA equal to the student. The
    run resumes on 2 ranks (a universal checkpoint: another world size) to step 6: the teacher
    is still the step-3 student, and Adam and the EMA counted 3 steps since the boundary (the
    resumed run did not reset them again)."""
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero1.json", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--start-steps", "8", "--round-steps", "3", "--rounds", "2", "--min-steps", "2", "--global-batch", "4",
            "--micro-batch", "2", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "3", "--eval-batches", "1",
            "--sample-steps", "2", "--num-samples", "1", "--eval-samples", "1", "--lr", "1e-2", "--warmup-steps", "0",
            "--reset-optimizer", "--reset-ema"]
    run_train([*args, "--max-steps", "3"], launcher=False, script="pgm_dist/distill.py")
    resumed = run_train(args, ranks=2, script="pgm_dist/distill.py")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout

    boundary = out / "checkpoints" / "step_00000003"
    assert all(int(state["step"]) == 0 and state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
               for state in adam_states(boundary))
    student = module_weights(boundary)
    ema = load_ema_weights(boundary)
    for name, tensor in student.items():
        torch.testing.assert_close(ema[name], tensor.float(), atol=0, rtol=0)
    assert torch.load(boundary / "mp_rank_00_model_states.pt", weights_only=False)["ema_updates"] == 0

    end = out / "checkpoints" / "step_00000006"
    assert len(list(end.glob("*optim_states.pt"))) == 2  # saved by the 2-rank run
    assert all(int(state["step"]) == 3 for state in adam_states(end))
    assert torch.load(end / "mp_rank_00_model_states.pt", weights_only=False)["ema_updates"] == 3
    round_teacher = load_file(str(end / "teacher.safetensors"))
    for name, tensor in student.items():
        torch.testing.assert_close(round_teacher[name], tensor.float(), atol=0, rtol=0)
    losses = scalars(out / "tb")["train/loss"]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values()), losses
    # Round 1's first step starts at teacher == student: small, as in the straight run; then they part.
    assert losses[4] < 1e-3 < min(losses[5], losses[6]), losses
