"""Every command line's ``--help`` states the defaults, each once."""
from __future__ import annotations

import dataclasses
import re

import pytest

from pgm_dist.data.__main__ import main as data_main
from pgm_dist.data.builder import BuildSettings
from pgm_dist.evaluate import main as evaluate_main
from pgm_dist.export import main as export_main
from pgm_dist.sample import main as sample_main
from pgm_dist.training.config import TrainConfig, build_parser


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return _options(capsys.readouterr().out)


def _options(help_text: str) -> str:
    """The options part of a --help, unwrapped onto one line."""
    return " ".join(help_text.split("options:", 1)[1].split())


def _option_help(text: str, flag: str) -> str:
    """The help of one option: from its flag to the next option."""
    return re.search(rf"{flag}( [A-Z_]+| \{{[^}}]+\}})? (.*?)(?= --[a-z]|$)", text).group(2)


def test_data_build_help_shows_the_build_defaults(capsys):
    text = _help(data_main, ["build"], capsys)
    defaults = BuildSettings()
    for flag, value in [("--vocab-size", defaults.vocab_size), ("--seq-len", defaults.seq_len),
                        ("--val-fraction", defaults.val_fraction), ("--model-type", defaults.model_type),
                        ("--workers", defaults.workers)]:
        assert _option_help(text, flag).endswith(f"(default: {value})"), flag
    assert "(default: 1024, or train blocks // 64" in _option_help(text, "--samples-per-shard")
    assert "(default: the Python standard library's source)" in _option_help(text, "--input")


@pytest.mark.parametrize("main,expected", [
    (evaluate_main, {"--micro-batch": "16", "--seed": "1234", "--device": "cpu", "--batches": "all",
                     "--data": "the folder the model was trained on"}),
    (sample_main, {"--num": "4", "--steps": "64", "--seed": "0", "--temperature": "1.0", "--top-p": "1.0",
                   "--device": "cpu"}),
])
def test_model_clis_show_their_defaults(main, expected, capsys):
    text = _help(main, [], capsys)
    for flag, value in expected.items():
        assert _option_help(text, flag).endswith(f"(default: {value})"), flag
    assert "(default: None)" not in text and "(default:" not in _option_help(text, "--model")  # required


def test_export_help_has_no_invented_defaults(capsys):
    text = _help(export_main, [], capsys)
    assert "--ckpt" in text and "(default:" not in text  # both options are required


def test_train_help_states_each_default_once():
    text = _options(build_parser().format_help())
    fields = dataclasses.fields(TrainConfig)
    for f in fields:
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.type in ("bool", bool):
            name = f.name.replace("_", "-")
            flag = f"--{name}, --no-{name}"
        described = _option_help(text, re.escape(flag))
        shown = f.default is not None and f.default is not False  # off switches state no default
        assert described.count("(default:") == (shown or "(default:" in f.metadata["help"]), flag
        if shown:
            assert described.endswith(f"(default: {f.default})"), flag
    assert _option_help(text, "--data").endswith("(default: build the built-in corpus into data_shards/default)")
