"""What TensorBoard shows: text summaries read back exactly as written (TensorBoard renders them as
Markdown), the Custom Scalars overview layout, and the run card of a local run."""
from __future__ import annotations

import markdown
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from pgm_dist.common.distributed import DistEnv
from pgm_dist.training.loop import TrainState
from pgm_dist.training.session import run_card
from pgm_dist.training.writer import OVERVIEW_LAYOUT, TensorBoardWriter, verbatim

SAMPLE = "def m(32):\n    x = a_b * c_d  # **not bold**\n    return `x` ```\n\n<b>&</b>"


def read_back(log_dir, tag: str) -> list[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def test_a_sample_reads_back_and_renders_exactly_as_generated(tmp_path):
    writer = TensorBoardWriter(tmp_path)
    writer.text("samples/0", SAMPLE, 5)
    writer.close()
    (stored,) = read_back(tmp_path, "samples/0")
    # TensorBoard's text plugin renders Markdown with fenced code: the code block holds the sample verbatim
    html = markdown.markdown(stored, extensions=["markdown.extensions.tables", "markdown.extensions.fenced_code"])
    code = html.split("<code>", 1)[1].rsplit("</code>", 1)[0]
    unescaped = code.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    assert unescaped == SAMPLE + "\n"
    assert "<em>" not in html and "<strong>" not in html


@pytest.mark.parametrize("text, fence", [("plain", "```"), ("a ``` b", "````"), ("`````", "``````")])
def test_the_fence_is_longer_than_any_backtick_run_inside(text, fence):
    assert verbatim(text) == f"{fence}\n{text}\n{fence}"


def test_the_overview_layout_is_written_for_custom_scalars(tmp_path):
    TensorBoardWriter(tmp_path).close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert category.title == "Overview"
    assert charts["loss: train and validation (nats/token)"] == ["train/loss", "val/nelbo"]
    assert set(charts) == set(OVERVIEW_LAYOUT["Overview"])
    assert {"train/lr", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_frac", "run/restarts"} <= {
        tag for tags in charts.values() for tag in tags}


def test_a_local_runs_card_says_what_is_known(monkeypatch):
    monkeypatch.setattr("sys.argv", ["pgm_dist/train.py", "--max-steps", "5", "--out", "my run"])
    setup = type("S", (), {"launch": {}, "env": DistEnv(0, 0, 2), "device": torch.device("cpu")})()
    card = run_card(setup, TrainState(step=7, restarts=1)).splitlines()
    assert card[0].startswith("local run on ") and card[0].endswith(": world size 2, restart 1, step 7")
    assert card[1] == "devices: 2 x cpu (CPU)"
    assert card[2] == "command: train.py --max-steps 5 --out 'my run'"
    assert "job -" not in "\n".join(card) and " on -" not in "\n".join(card)
    launched = type("S", (), {"launch": {"job_id": "42", "nodes": "n1,n2"}, "env": DistEnv(0, 0, 2),
                              "device": torch.device("cpu")})()
    assert run_card(launched, TrainState()).splitlines()[0] == "job 42 on n1,n2: world size 2, restart 0, step 0"
