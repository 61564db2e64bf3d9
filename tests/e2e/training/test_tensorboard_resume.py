"""A run stopped cleanly, resumed, crashed in the middle of a checkpoint save and resumed again,
through the real ``deepspeed`` launcher: what TensorBoard reads back, and what the model CLIs
find in its checkpoints."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgm_dist.checkpoints.saver import FAULT_ENV
from pgm_dist.data.builder import BuildSettings, build
from pgm_dist.data.documents import default_corpus_paths
from pgm_dist.evaluate import main as evaluate_main
from pgm_dist.export import main as export_main
from tests.helpers.training import run_train, scalar_events

LOGGED = ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"]


@pytest.fixture(scope="module")
def resumed_run(data, tmp_path_factory):
    """Steps 1-4 (checkpoints 2, 4); resumed to 8 but killed inside the save of step 8, after
    steps 5-8 were logged (checkpoint 6 is the last complete one); resumed from 6 to 8."""
    out = tmp_path_factory.mktemp("tb_resume")
    common = ["--data", str(data), "--out", str(out), "--ckpt-every", "2", "--log-every", "1", "--eval-every", "0",
              "--global-batch", "8", "--micro-batch", "4", "--eval-batches", "2", "--sample-steps", "4",
              "--num-samples", "1"]
    run_train([*common, "--max-steps", "4"])
    crashed = run_train([*common, "--max-steps", "8"], env={FAULT_ENV: "8:0"}, check=False)
    assert crashed.returncode != 0 and "at step 4" in crashed.stdout
    assert not (out / "checkpoints" / "step_00000008" / "COMPLETE").exists()
    resumed = run_train([*common, "--max-steps", "8"])
    assert "step_00000006 at step 6" in resumed.stdout
    return out


def test_both_axes_hold_every_logged_point_once_across_a_clean_and_a_crashed_resume(resumed_run):
    tb = resumed_run / "tb"
    config = json.loads((resumed_run / "config.json").read_text())
    tokens_per_step = config["batch"]["global"] * config["model"]["seq_len"]
    # The crashed segment did write steps 7 and 8 (read without TensorBoard's purge).
    raw = EventAccumulator(str(tb), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    raw.Reload()
    assert [e.step for e in raw.Scalars("train/loss")].count(7) == 2

    events = scalar_events(tb)
    for tag in LOGGED:
        by_step, by_tokens = events[tag], events[f"by_tokens/{tag}"]
        assert [s for s, _ in by_step] == list(range(1, 9)), tag
        assert [t for t, _ in by_tokens] == [s * tokens_per_step for s in range(1, 9)], tag
        assert [v for _, v in by_tokens] == [v for _, v in by_step], tag
    for axis, unit in (("", 1), ("by_tokens/", tokens_per_step)):
        assert [s for s, _ in events[f"{axis}val/nelbo"]] == [4 * unit, 8 * unit]  # end of each finished run
        # Each point is from the segment that survived: restarts 0 before step 4, 1 up to 6, 2 after.
        kept = [(s // unit, v) for s, v in events[f"{axis}run/restarts"] if s // unit in (1, 3, 5, 7, 8)]
        assert kept == [(1, 0), (3, 0), (5, 1), (7, 2), (8, 2)], axis


def test_evaluate_defaults_to_the_data_the_model_was_trained_on(resumed_run, data, tmp_path, capsys):
    def nelbo(argv) -> tuple[str, str]:
        assert evaluate_main([*argv, "--batches", "2", "--micro-batch", "4"]) == 0
        out = capsys.readouterr().out
        return next(line for line in out.splitlines() if line.startswith("NELBO")), out

    explicit, _ = nelbo(["--model", str(resumed_run), "--data", str(data)])
    default, report = nelbo(["--model", str(resumed_run)])
    assert default == explicit and f"data {data} (the folder the model was trained on)" in report
    export = tmp_path / "export"
    assert export_main(["--ckpt", str(resumed_run), "--out", str(export)]) == 0
    assert nelbo(["--model", str(export)])[0] == explicit

    corpus = [default_corpus_paths()[0] / "json", default_corpus_paths()[0] / "email"]
    other = tmp_path / "other_tokenizer"
    build(other, corpus, BuildSettings(vocab_size=400, seq_len=64, samples_per_shard=16, val_fraction=0.2),
          progress=False, log=lambda *_: None)
    capsys.readouterr()
    assert evaluate_main(["--model", str(export), "--data", str(other)]) == 2
    assert "was tokenized with another tokenizer than the model's" in capsys.readouterr().err
    config = json.loads((export / "config.json").read_text())
    del config["data"]  # an export made before exports recorded their data
    (export / "config.json").write_text(json.dumps(config))
    assert evaluate_main(["--model", str(export)]) == 2
    assert "does not record the data folder it was trained on" in capsys.readouterr().err
