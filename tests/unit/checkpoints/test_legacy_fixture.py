"""A checkpoint and an export written before the package moved into stage folders still load:
both hold JSON, safetensors and DeepSpeed's own files, no class paths."""
import json

import torch
from safetensors.torch import load_file

from pgm_dist.checkpoints.format import read_state
from pgm_dist.checkpoints.load import load_model
from pgm_dist.models.config import ModelConfig
from tests.helpers.legacy import EXPECTED, LEGACY

CHECKPOINT = LEGACY / "checkpoint" / EXPECTED["checkpoint"]


def test_pre_move_export_gives_the_logits_it_gave_before_the_move():
    probe = load_file(str(LEGACY / "export_probe.safetensors"))
    loaded = load_model(LEGACY / "export")
    with torch.no_grad():
        logits = loaded.model(probe["tokens"], probe["groups"])
    torch.testing.assert_close(logits, probe["logits"], atol=1e-6, rtol=1e-6)


def test_pre_move_export_config_and_tokenizer_load():
    loaded = load_model(LEGACY / "export")
    info = json.loads((LEGACY / "export" / "config.json").read_text())
    assert loaded.config == ModelConfig.from_dict(info["model_config"])
    assert (loaded.config.d_model, loaded.config.n_enc, loaded.config.n_dec) == (8, 1, 1)
    assert loaded.tokenizer.sha256 == info["tokenizer_sha256"]
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Beautiful is better")) == "Beautiful is better"


def test_pre_move_checkpoint_loads_its_ema_weights_without_deepspeed():
    loaded = load_model(CHECKPOINT)
    ema = load_file(str(CHECKPOINT / "ema.safetensors"))
    state = loaded.model.state_dict()
    assert state.keys() == ema.keys()
    for name, value in ema.items():
        assert torch.equal(state[name], value), name
    saved = read_state(CHECKPOINT)
    assert (saved["step"], saved["world_size"], saved["zero_stage"]) == (3, 1, 2)
