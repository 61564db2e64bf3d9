"""A run resuming a checkpoint written before a model field existed goes on with the checkpoint's value
(an image run started before register_order: its registers stay where they were)."""
import json

import pytest

from pgm_dist.common.errors import ConfigError
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.shards import DataFolder
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.setup import check_resume, codec_sha256


def test_an_image_run_from_before_register_order_resumes_with_its_own_order(tmp_path):
    assert data_cli(["build-images", "--digits", "--out", str(tmp_path / "digits")]) == 0
    folder = DataFolder.open(tmp_path / "digits")

    def run_config():
        return ModelConfig.preset("pgm-img-tiny", vocab_size=18, seq_len=65, num_classes=10, image_grid=[8, 8],
                                  bos_id=17, eos_id=17)
    saved = {k: v for k, v in run_config().to_dict().items() if k != "register_order"}
    checkpoint = tmp_path / "step_00000010"
    checkpoint.mkdir()
    (checkpoint / "pgm_state.json").write_text(json.dumps({"model_config": saved,
                                                            "tokenizer_sha256": codec_sha256(folder, None)}))
    config = run_config()
    assert config.register_order == "reference"
    check_resume(checkpoint, config, folder, None)
    assert config.register_order == "legacy"  # the model it resumes
    other = {**saved, "n_enc": 3}  # a real difference is still refused
    (checkpoint / "pgm_state.json").write_text(json.dumps({"model_config": other,
                                                            "tokenizer_sha256": codec_sha256(folder, None)}))
    with pytest.raises(ConfigError, match="holds another model"):
        check_resume(checkpoint, run_config(), folder, None)
