"""Unit tests of the engine's parts that need no process group."""
import json
import sys
import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pgm_dist.attention.interface import AttentionMask
from pgm_dist.checkpoints.format import MARKER, complete_checkpoints, find_resume_checkpoint
from pgm_dist.common.errors import ConfigError
from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig
from pgm_dist.models.flops import attention_key_counts, peak_flops, training_flops_per_token
from pgm_dist.objectives import T_MIN, LogLinearSchedule, low_discrepancy_times, partition_groups
from pgm_dist.training.config import TrainConfig, parse_train_config, resolve_ds_config
from pgm_dist.training.ema import EMA
from pgm_dist.training.engine import lr_lambda
from pgm_dist.training.telemetry import GpuTelemetry


@pytest.mark.parametrize("preset", ["pgm-tiny", "mdlm-tiny"])
def test_flops_formula_matches_flop_counter(preset):
    """Dense formula vs PyTorch's matmul count. It leaves out only the adaLN modulation
    (once per sequence, ~0.07% here); forgetting GroupSwap's attention is -5% at L = 256."""
    cfg = ModelConfig.preset(preset, vocab_size=512, seq_len=256, attention="reference")
    model = build_model(cfg)
    B = 2
    tokens = torch.randint(0, 512, (B, cfg.seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(tokens, torch.rand(B, cfg.seq_len) < 0.5) if cfg.arch == "pgm" else model(tokens)
        out[..., :512].sum().backward()
    formula = training_flops_per_token(model, cfg, dense=True) * B * cfg.seq_len
    assert abs(formula / counter.get_total_flops() - 1) < 0.005


def test_partition_attention_pairs_match_a_monte_carlo_over_partitions():
    """The formula's keys per query against the masks of partitions drawn as in training
    (stratified times, ``partition_groups``); 1024 sequences of 256 give ~0.1% noise."""
    L, n = 256, 1024
    t = low_discrepancy_times(0.37, torch.arange(n), n, T_MIN)
    groups = partition_groups(t, L, LogLinearSchedule(), torch.Generator().manual_seed(0))
    visible = {"same_group": 0, "cross_group": 0}
    for chunk in groups.split(256):
        for mode in visible:
            visible[mode] += AttentionMask(mode, groups=chunk).allowed(L, L, "cpu").sum().item() / (n * L)
    # Two depth splits, so that both the encoder's and the decoder's per-layer counts are checked.
    for n_enc, n_dec in ((6, 6), (1, 4)):
        cfg = ModelConfig.preset("pgm-small", vocab_size=100, seq_len=L, n_enc=n_enc, n_dec=n_dec)
        expected = n_enc * visible["same_group"] + (n_dec + 1) * visible["cross_group"]  # + 1: GroupSwap
        assert attention_key_counts(cfg) == pytest.approx(expected, rel=0.005)
        assert attention_key_counts(cfg, dense=True) == (n_enc + n_dec + 1) * L
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("cpu") is None


def test_lr_schedule():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    constant = lr_lambda(TrainConfig(warmup_steps=4))
    assert [constant(s) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]


def test_ema_warmup_update_and_exact_swap():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9999)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay 1/10: shadow moves 90% of the way
    torch.testing.assert_close(ema.shadow["weight"], start["weight"] + 0.9)
    raw = model.weight.detach().clone()
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, raw)
    ema.updates = 10**6
    assert ema.current_decay() == 0.9999


def test_ds_config_resolution(tmp_path):
    cfg = resolve_ds_config("ds_configs/zero2.json", world_size=2, device=torch.device("cpu"))
    assert cfg["bf16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0
    assert cfg["train_batch_size"] % (cfg["train_micro_batch_size_per_gpu"] * 2) == 0
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_ds_config("ds_configs/zero2.json", world_size=3, device=torch.device("cpu"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match="gradient_clipping"):
        resolve_ds_config(bad, world_size=1, device=torch.device("cpu"))
    bad.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1,
                               "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_ds_config(bad, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="not found"):
        resolve_ds_config(tmp_path / "none.json", world_size=1, device=torch.device("cpu"))


def test_cli_rejects_unknown_and_invalid_options(capsys):
    with pytest.raises(SystemExit):
        parse_train_config(["--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_train_config(["--max-steps", "0"])
    assert "--max-steps must be at least 1" in capsys.readouterr().err
    cfg = parse_train_config(["--ds_config", "x.json", "--local_rank=1", "--no-progress", "--model", "mdlm-tiny"])
    assert cfg.ds_config == "x.json" and cfg.progress is False and cfg.model == "mdlm-tiny"


def test_resume_resolution(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False)):
        (root / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:08d}" / MARKER).write_text("")
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003", "step_00000006"]
    assert find_resume_checkpoint("auto", root).name == "step_00000006"
    with pytest.raises(ConfigError, match="--resume never, but .* holds checkpoints of an earlier run"):
        find_resume_checkpoint("never", root)
    assert find_resume_checkpoint("never", tmp_path / "none") is None
    assert find_resume_checkpoint(str(tmp_path), root).name == "step_00000006"
    assert find_resume_checkpoint(str(root / "step_00000003"), root).name == "step_00000003"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(root / "step_00000009"), root)
    assert find_resume_checkpoint("auto", tmp_path / "none") is None


def test_no_nvml_means_no_gpu_scalars():
    assert GpuTelemetry.for_device(torch.device("cpu")).read() == {}
    assert GpuTelemetry("GPU-00000000-0000-0000-0000-000000000000").read() == {}  # no driver here


def test_fake_nvml_gives_scalars_in_the_right_units(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    fake.NVMLError = NVMLError
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetUUID = lambda h: [b"GPU-aaaa", b"GPU-bbbb"][h]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    fake.nvmlDeviceGetPowerUsage = lambda h: 412_500  # milliwatts

    def no_temperature(h, sensor):
        raise NVMLError("not supported")

    fake.nvmlDeviceGetTemperature = no_temperature
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    values = GpuTelemetry("bbbb").read()
    assert values == {"gpu/utilization_pct": 87.0, "gpu/memory_used_gib": 3.0, "gpu/memory_total_gib": 80.0,
                      "gpu/power_w": 412.5}
    assert GpuTelemetry("cccc").read() == {}  # no GPU with that UUID


def test_dist_timeout_option_is_parsed_and_checked():
    assert parse_train_config(["--dist-timeout-min", "2.5"]).dist_timeout_min == 2.5
    assert TrainConfig().dist_timeout_min == 10.0
    with pytest.raises(ConfigError, match="--dist-timeout-min must be > 0"):
        TrainConfig(dist_timeout_min=0)
