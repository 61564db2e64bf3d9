"""The authors' released text checkpoints as our models (pgm_dist/checkpoints/reference.py).

Release-layout files are made by tests/helpers/reference.py (every key and shape as the reference
writes them, all parameters perturbed, reduced width). The reference forward is re-stated here,
densely and from its own tensors (fused qkv, weight-only LayerNorms, cos-first sinusoids,
the time embedding at sigma = 0, biased GroupSwap, MASK logit at -inf); the converted model's
log-probabilities must equal it to 1e-5 of their scale, on the training path and on the
sampling path, from the EMA weights and from the raw ones.
"""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pgm_dist
from pgm_dist.checkpoints.load import REFERENCE_VQ, load_model
from pgm_dist.checkpoints.reference import (
    _Placeholder,
    _rebuilt,
    _Unpickler,
    backbone_state,
    load_reference,
    read_reference,
)
from pgm_dist.convert import main as convert_main
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.tokenizer import Tokenizer, write_hf_tokenizer
from pgm_dist.evaluate import main as evaluate_main
from pgm_dist.export import main as export_main
from pgm_dist.images.vq import VQConfig, VQModel
from pgm_dist.models import build_model
from pgm_dist.sample import main as sample_main
from tests.helpers.hf import sample_texts, train_bpe
from tests.helpers.reference import (
    random_reference_state,
    reference_image_layout,
    reference_layout,
    save_image_release,
    save_release,
)

V_REF = 41  # 40 tokens and MASK (id 40), as GPT-2's 50,257 and MASK 50,257
L = 12


# ---- the reference forward, dense, from the reference's tensors --------------------------------------

def _ln(x, weight=None, bias=None):
    y = F.layer_norm(x.double(), x.shape[-1:])
    if weight is not None:
        y = y * weight.double()
    return y + bias.double() if bias is not None else y


def _linear(x, sd, name, bias=True):
    y = x @ sd[f"{name}.weight"].double().T
    return y + sd[f"{name}.bias"].double() if bias else y


def _rotary(x, positions, inv_freq):
    """NeoX half-split over the full head dim: x [B, H, N, Dh], positions [B, N]."""
    angles = positions.double()[..., None] * inv_freq.double()
    emb = torch.cat([angles, angles], -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _attention(q, k, v, mask, heads, q_pos, k_pos, inv_freq):
    """q [B, Nq, d], k/v [B, Nk, d], mask [B, Nq, Nk] (True: attend) -> [B, Nq, d]."""
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)
    q, k, v = _rotary(split(q), q_pos, inv_freq), _rotary(split(k), k_pos, inv_freq), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def _time_conditioning(sd):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    t_freq = torch.cat([torch.cos(0 * freqs), torch.sin(0 * freqs)])  # sigma = 0, cos first
    hidden = F.silu(_linear(t_freq, sd, "sigma_map.mlp.0"))
    return F.silu(_linear(hidden, sd, "sigma_map.mlp.2"))[None]


def _mlp(x, sd, p):
    return _linear(F.gelu(_linear(x, sd, f"{p}.mlp.0"), approximate="tanh"), sd, f"{p}.mlp.2")


def _mods(cond, sd, name, n):
    """The adaLN linear on the conditioning [B or 1, c] -> n chunks [B or 1, 1, d]."""
    return _linear(cond, sd, name)[:, None].chunk(n, -1)


def _self_block(x, sd, p, cond, mask, pos, heads):
    shift, scale, gate, shift_m, scale_m, gate_m = _mods(cond, sd, f"{p}.adaLN_modulation", 6)
    h = _ln(x, sd[f"{p}.norm1.weight"]) * (1 + scale) + shift
    q, k, v = (h @ sd[f"{p}.attn_qkv.weight"].double().T).chunk(3, -1)
    o = _attention(q, k, v, mask, heads, pos, pos, sd["rotary_emb.inv_freq"])
    x = x + gate * (o @ sd[f"{p}.attn_out.weight"].double().T)
    return x + gate_m * _mlp(_ln(x, sd[f"{p}.norm2.weight"]) * (1 + scale_m) + shift_m, sd, p)


def _cross_block(x, memory, sd, p, cond, mask, q_pos, k_pos, heads):
    shift, scale, gate, shift_m, scale_m, gate_m = _mods(cond, sd, f"{p}.adaLN_modulation", 6)
    h = _ln(x, sd[f"{p}.q_norm1.weight"]) * (1 + scale) + shift
    m = _ln(memory, sd[f"{p}.kv_norm1.weight"])
    k, v = (m @ sd[f"{p}.attn_kv.weight"].double().T).chunk(2, -1)
    o = _attention(h @ sd[f"{p}.attn_q.weight"].double().T, k, v, mask, heads, q_pos, k_pos,
                   sd["rotary_emb.inv_freq"])
    x = x + gate * (o @ sd[f"{p}.attn_out.weight"].double().T)
    return x + gate_m * _mlp(_ln(x, sd[f"{p}.norm2.weight"]) * (1 + scale_m) + shift_m, sd, p)


def _output_logprobs(x, sd, cond, mask_fill, mask_id=-1):
    shift, scale = _mods(cond, sd, "output_layer.adaLN_modulation", 2)
    logits = _linear(_ln(x, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift, sd, "output_layer.linear")
    logits[..., mask_id] = mask_fill(logits[..., mask_id])  # the MASK id (text: the last)
    return logits.log_softmax(-1)


def reference_pgm(sd, heads, n_enc, n_dec, tokens, enc_pos, enc_mask, query_pos, cross_mask, labels=None,
                  prefix=None):
    """PartitionDIT: encoder over ``tokens`` at ``enc_pos``, GroupSwap queries at ``query_pos``; the image
    model: the class embedding of ``labels`` as the raw conditioning, ``prefix`` [B, P, d] (its register
    tokens) before the embedded tokens, the MASK id next to last and its logit at -1e6."""
    d = sd["vocab_embed.embedding"].shape[1]
    x = sd["vocab_embed.embedding"].double()[tokens]
    if labels is None:
        cond, mask_id, fill = _time_conditioning(sd), -1, lambda col: torch.full_like(col, float("-inf"))
    else:
        cond, mask_id, fill = sd["cls_embed.embedding_table.weight"].double()[labels], -2, lambda col: col * 0 - 1e6
    if prefix is not None:
        x = torch.cat([prefix.double(), x], 1)
    for i in range(n_enc):
        x = _self_block(x, sd, f"encoder.blocks.{i}", cond, enc_mask, enc_pos, heads)
    s = "decoder.group_swap"
    k_idx = torch.arange(d // 2, dtype=torch.float64)
    angles = query_pos.double()[..., None] / 10000 ** (2 * k_idx / d)
    q = sd[f"{s}.base_embedding"].double()[0] + torch.cat([angles.cos(), angles.sin()], -1)  # cos first
    q = _linear(_ln(q, sd[f"{s}.pre_query_norm.weight"], sd[f"{s}.pre_query_norm.bias"]), sd, f"{s}.query_processor")
    k, v = _linear(x, sd, f"{s}.hidden_to_key_value").chunk(2, -1)
    o = _attention(q, k, v, cross_mask, heads, query_pos, enc_pos, sd["rotary_emb.inv_freq"])
    y = _linear(o, sd, f"{s}.output_linear")
    for j in range(n_dec):
        y = _cross_block(y, x, sd, f"decoder.layers.{j}", cond, cross_mask, query_pos, enc_pos, heads)
    return _output_logprobs(y, sd, cond, fill, mask_id)


def reference_mdlm(sd, heads, n_blocks, tokens):
    cond = _time_conditioning(sd)
    x = sd["vocab_embed.embedding"].double()[tokens]
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    full = torch.ones(tokens.shape[0], tokens.shape[1], tokens.shape[1], dtype=torch.bool)
    for i in range(n_blocks):
        x = _self_block(x, sd, f"blocks.{i}", cond, full, pos, heads)
    return _output_logprobs(x, sd, cond, lambda col: col - 1e6)


# ---- tests ---------------------------------------------------------------------------------------------

SHAPES = {  # (d, heads, n_enc, n_dec): PGM 8-8's and 6-6-d1024's structure at reduced width
    "pgm-8-8": (64, 2, 3, 3), "pgm-6-6-d1024": (96, 3, 2, 2), "mdlm": (64, 2, 3, 0)}


@pytest.fixture(scope="module", params=list(SHAPES))
def release(request, tmp_path_factory):
    name = request.param
    d, heads, n_enc, n_dec = SHAPES[name]
    arch = "mdlm" if name == "mdlm" else "pgm"
    layout = reference_layout(arch, V_REF, d, heads, n_enc=n_enc, n_dec=n_dec)
    raw, ema = random_reference_state(layout, seed=1), random_reference_state(layout, seed=2)
    path = save_release(tmp_path_factory.mktemp("release") / f"{name}.ckpt", raw, ema)
    return name, path, {"raw": raw, "ema": ema}, (arch, heads, n_enc, n_dec)


def assert_logprobs_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    assert (ours.double() - theirs).abs().max().item() <= 1e-5 * scale, (ours.double() - theirs).abs().max()


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_converted_logprobs_equal_the_reference_forward(release, weights):
    name, path, states, (arch, heads, n_enc, n_dec) = release
    config, state, info = load_reference(path, weights, seq_len=L)
    assert (config.arch, config.n_heads, config.n_enc, config.vocab_size) == (arch, heads, n_enc, V_REF - 1)
    assert info["weights"] == weights and info["global_step"] == 1234 and info["ema_decay"] == 0.9999
    config.dropout = 0.0
    model = build_model(config).double().eval()
    assert model.load_state_dict({k: v.double() for k, v in state.items()}) is not None  # strict: every key
    sd = states[weights]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V_REF - 1, (3, L), generator=g)
    with torch.no_grad():
        if arch == "mdlm":
            noisy = tokens.masked_fill(torch.rand(3, L, generator=g) < 0.5, config.mask_id)
            assert_logprobs_equal(model(noisy).log_softmax(-1), reference_mdlm(sd, heads, n_enc, noisy)[..., :-1])
            return
        groups = torch.rand(3, L, generator=g) < 0.5
        groups[:, 0], groups[:, 1] = False, True  # both groups non-empty
        pos = torch.arange(L)[None].expand(3, L)
        same, other = groups[:, :, None] == groups[:, None, :], groups[:, :, None] != groups[:, None, :]
        theirs = reference_pgm(sd, heads, n_enc, n_dec, tokens, pos, same, pos, other)
        assert_logprobs_equal(model(tokens, groups).log_softmax(-1), theirs[..., :-1])
        # the sampling path: packed clean tokens (right-padded) at their positions, queries elsewhere
        lengths = torch.tensor([5, 2, 7])
        perm = torch.stack([torch.randperm(L, generator=g) for _ in range(3)])
        clean_pos, query_pos = perm[:, :7], perm[:, 7:]
        clean = tokens.gather(1, clean_pos)
        keys = torch.arange(7)[None, None, :] < lengths[:, None, None]
        theirs = reference_pgm(sd, heads, n_enc, n_dec, clean, clean_pos, keys.expand(3, 7, 7), query_pos,
                               keys.expand(3, L - 7, 7))
        ours = model.predict(clean, clean_pos, query_pos, lengths)
        assert_logprobs_equal(ours.log_softmax(-1), theirs[..., :-1])


# ---- the commands: convert, load_model on the file, sample; errors ----------------------------------

@pytest.fixture(scope="module")
def released_with_tokenizer(tmp_path_factory):
    """(release file, tokenizer.json, tokenizer folder): a PGM over a byte-level BPE's vocabulary + MASK."""
    tmp = tmp_path_factory.mktemp("released")
    file, folder = train_bpe(sample_texts(), tmp / "bpe")
    vocab = Tokenizer(write_hf_tokenizer(tmp / "tok.model", str(file)).path).vocab_size
    layout = reference_layout("pgm", vocab + 1, 64, 2, n_enc=2, n_dec=2)
    raw = random_reference_state(layout, seed=3)
    return save_release(tmp / "pgm.ckpt", raw, random_reference_state(layout, seed=4)), file, folder, raw


def test_convert_writes_an_export_equal_to_the_file_loaded_in_memory(released_with_tokenizer, tmp_path, capsys):
    ckpt, file, folder, _ = released_with_tokenizer
    out = tmp_path / "export"
    assert convert_main(["reference", str(ckpt), "--out", str(out), "--tokenizer", str(file)]) == 0
    exported, in_memory = load_model(out), pgm_dist.load_model(ckpt, tokenizer=str(folder))
    assert exported.config == in_memory.config and exported.config.swap_bias and exported.config.seq_len == 1024
    assert exported.tokenizer.sha256 == in_memory.tokenizer.sha256  # a name, a folder or a file: one tokenizer
    assert exported.config.bos_id == exported.tokenizer.bos_id == exported.tokenizer.eos_id
    info = json.loads((out / "config.json").read_text())
    assert info["reference"]["weights"] == "ema" and info["step"] == 1234
    tokens = torch.randint(0, exported.config.vocab_size, (2, 16))
    groups = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(exported.model(tokens, groups), in_memory.model(tokens, groups), rtol=0, atol=0)
    raw = load_reference(ckpt, "raw")[1]
    assert not torch.equal(raw["embed.weight"], exported.model.state_dict()["embed.weight"])  # EMA, not raw
    capsys.readouterr()
    assert sample_main(["--model", str(ckpt), "--tokenizer", str(file), "--num", "1", "--steps", "4", "--seed", "1",
                        "--prompt", "alpha beta", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("--- sample 0 ---\nalpha beta")


def test_reference_file_errors(released_with_tokenizer, tmp_path, capsys):
    ckpt, file, _, raw = released_with_tokenizer
    other, _ = train_bpe(sample_texts(20, seed=9), tmp_path / "other", vocab_size=280)
    out = str(tmp_path / "out")
    assert convert_main(["reference", str(ckpt), "--out", out, "--tokenizer", str(other)]) == 2
    assert "ids, the model" in capsys.readouterr().err
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:5000])  # a cut download
    assert convert_main(["reference", str(broken), "--out", out, "--tokenizer", str(file)]) == 2
    assert "not a readable reference checkpoint" in capsys.readouterr().err
    no_ema = save_release(tmp_path / "raw-only.ckpt", raw, None)
    assert convert_main(["reference", str(no_ema), "--out", out, "--tokenizer", str(file)]) == 2
    err = capsys.readouterr().err
    assert "has no EMA weights" in err and "convert with --weights raw" in err
    assert convert_main(["reference", str(no_ema), "--out", out, "--tokenizer", str(file), "--weights", "raw"]) == 0
    torch.save({"model": {}, "iter": 3}, tmp_path / "other.ckpt")
    assert convert_main(["reference", str(tmp_path / "other.ckpt"), "--out", out]) == 2
    assert "not a reference checkpoint (no 'state_dict' (text) or 'model_state_dict' (images); it holds model, iter)" \
        in capsys.readouterr().err
    torch.save({"model_state_dict": {"vocab_embed.embedding": torch.zeros(3, 4)}}, tmp_path / "image.ckpt")
    assert convert_main(["reference", str(tmp_path / "image.ckpt"), "--out", out, "--weights", "ema"]) == 2
    assert "holds only its raw weights (no EMA): convert with --weights raw" in capsys.readouterr().err
    assert export_main(["--ckpt", str(ckpt), "--out", out]) == 2
    assert "python -m pgm_dist.convert reference" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.target}",))


def test_a_release_file_cannot_run_code(tmp_path):
    """The pickle's classes other than tensors and containers are placeholders: os.system is not called."""
    _Exploit.target = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": _Exploit()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="holds no 'backbone.' parameters"):
        backbone_state(read_reference(tmp_path / "evil.ckpt"))
    assert not _Exploit.target.exists()


# ---- the image PGMs ------------------------------------------------------------------------------------

CODEBOOK, CLASSES, GRID = 30, 5, (3, 4)


@pytest.mark.parametrize("depths", [(3, 3), (4, 2)], ids=["12-12", "14-10"])
def test_converted_image_pgm_equals_the_reference_forward(depths, tmp_path):
    """Registers in the reference's order (group 1's at position 0, group 0's at 1; on the sampling path
    group 0's at 1), the class embedding as the raw conditioning, MASK (next to last) dropped, BOS last."""
    n_enc, n_dec = depths
    layout = reference_image_layout(CODEBOOK, 64, 2, CLASSES, n_enc=n_enc, n_dec=n_dec)
    sd = random_reference_state(layout, seed=7)
    path = save_image_release(tmp_path / "images_pgm.ckpt", sd)
    config, state, info = load_reference(path, image_grid=GRID)
    assert info["weights"] == "raw" and info["global_step"] == 4321
    assert (config.n_enc, config.n_dec, config.num_classes, config.vocab_size, config.bos_id) == (
        n_enc, n_dec, CLASSES, CODEBOOK + 1, CODEBOOK)
    assert config.registers and not config.cond_silu and config.register_order == "reference"
    config.dropout = 0.0
    model = build_model(config).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    keep = torch.cat([torch.arange(CODEBOOK), torch.tensor([CODEBOOK + 1])])  # codes and BOS, not MASK
    g = torch.Generator().manual_seed(1)
    B, L = 3, 1 + GRID[0] * GRID[1]
    tokens = torch.randint(0, CODEBOOK, (B, L), generator=g)
    tokens[:, 0] = CODEBOOK  # our BOS; the reference's is CODEBOOK + 1
    labels = torch.tensor([0, 3, CLASSES])  # the last: the null label
    groups = torch.rand(B, L, generator=g) < 0.5
    groups[:, 0], groups[:, 1] = False, True
    ref_tokens = tokens.masked_fill(tokens == CODEBOOK, CODEBOOK + 1)
    regs = sd["reg_tokens.weight"][None].expand(B, 2, 64)  # row 0: group 1's, row 1: group 0's
    ref_groups = torch.cat([torch.tensor([True, False]).expand(B, 2), groups], 1)
    pos = torch.arange(L + 2)[None].expand(B, L + 2)
    same = ref_groups[:, :, None] == ref_groups[:, None, :]
    with torch.no_grad():
        theirs = reference_pgm(sd, 2, n_enc, n_dec, ref_tokens, pos, same, pos, ~same, labels=labels, prefix=regs)
        assert_logprobs_equal(model(tokens, groups, labels).log_softmax(-1), theirs[:, 2:][..., keep])
        # sampling: BOS and the revealed codes packed (right-padded), group 0's register at position 1
        lengths = torch.tensor([4, 1, 6])
        clean_pos = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(L - 1, generator=g)])
                                 for _ in range(B)])
        clean_pos, query_pos = clean_pos[:, :6], clean_pos[:, 6:]
        clean = tokens.gather(1, clean_pos)
        keys = torch.arange(7)[None, None, :] < (lengths + 1)[:, None, None]  # the register + n clean tokens
        theirs = reference_pgm(sd, 2, n_enc, n_dec, clean.masked_fill(clean == CODEBOOK, CODEBOOK + 1),
                               torch.cat([torch.ones(B, 1, dtype=torch.long), clean_pos + 2], 1), keys.expand(B, 7, 7),
                               query_pos + 2, keys.expand(B, query_pos.shape[1], 7), labels=labels,
                               prefix=sd["reg_tokens.weight"][1][None, None].expand(B, 1, 64))
        assert_logprobs_equal(model.predict(clean, clean_pos, query_pos, lengths, labels).log_softmax(-1),
                              theirs[..., keep])


def test_an_image_release_converts_to_an_export_and_samples_pictures(tmp_path, capsys):
    """convert --vq writes the VQ decoder (its config read from its shapes) beside the weights; sample
    draws a grid of pictures from the export; without --vq it says where the decoder is missing."""
    layout = reference_image_layout(CODEBOOK, 64, 2, CLASSES)
    path = save_image_release(tmp_path / "images_pgm.ckpt", random_reference_state(layout, seed=8))
    bare = tmp_path / "bare"
    assert convert_main(["reference", str(path), "--out", str(bare)]) == 0  # the model alone
    loaded = load_model(bare)
    assert loaded.tokenizer is None and loaded.info["data_meta"]["image"]["vq"] == REFERENCE_VQ.to_dict()
    grid = tmp_path / "grid.png"
    assert sample_main(["--model", str(bare), "--num", "1", "--steps", "2", "--classes", "0", "--device", "cpu",
                        "--out", str(grid)]) == 2
    assert "the VQ decoder of" in capsys.readouterr().err
    vq_config = VQConfig(codebook_size=CODEBOOK, codebook_embed_dim=4, ch=32, encoder_ch_mult=(1, 2),
                         decoder_ch_mult=(1, 2), z_channels=8, num_res_blocks=1)
    torch.save({"model": VQModel(vq_config).state_dict()}, tmp_path / "vq.pt")
    out = tmp_path / "export"
    assert convert_main(["reference", str(path), "--out", str(out), "--vq", str(tmp_path / "vq.pt")]) == 0
    assert load_model(out).info["data_meta"]["image"]["vq"] == vq_config.to_dict()
    assert sample_main(["--model", str(out), "--num", "1", "--steps", "2", "--classes", "0", "4", "--device", "cpu",
                        "--out", str(grid)]) == 0
    picture = np.asarray(Image.open(grid))
    assert picture.ndim == 3 and picture.shape[0] >= 2 * GRID[0] * 2  # two rows of 6 x 8 pixel pictures, scaled
    wrong = VQConfig(codebook_size=CODEBOOK + 1, codebook_embed_dim=4, ch=32, encoder_ch_mult=(1, 2),
                     decoder_ch_mult=(1, 2), z_channels=8, num_res_blocks=1)
    torch.save({"model": VQModel(wrong).state_dict()}, tmp_path / "wrong.pt")
    assert convert_main(["reference", str(path), "--out", str(out), "--vq", str(tmp_path / "wrong.pt")]) == 2
    assert f"has {CODEBOOK + 1} codes, the image model" in capsys.readouterr().err


def test_a_dotted_global_cannot_reach_past_the_allowed_names(tmp_path):
    """Protocol 4 names a global by a dotted path, followed attribute by attribute: an allowed function's
    ``__globals__`` would hand out its module's dictionary (and from there any function). Refused."""
    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()
    payload = b"\x80\x04" + short("torch._utils") + short("_rebuild_tensor.__globals__") + b"\x93."
    loaded = _Unpickler(io.BytesIO(payload)).load()
    assert isinstance(loaded, type) and issubclass(loaded, _Placeholder)  # a stand-in, not the dict
    raw = tmp_path / "legacy.ckpt"  # the same as a whole (non-zip) file: the legacy path reads it too
    raw.write_bytes(payload)
    with pytest.raises(ValueError, match="not a readable reference checkpoint|not a reference checkpoint"):
        read_reference(raw)
    assert _rebuilt("torch._utils", "_rebuild_tensor_v2") and _rebuilt("torch", "FloatStorage")
    assert not _rebuilt("torch._utils", "_import_dotted_name") and not _rebuilt("torch", "load")
    assert not _rebuilt("builtins", "eval") and not _rebuilt("posix", "system")


def test_evaluate_a_converted_text_model_on_data_built_with_its_tokenizer(released_with_tokenizer, tmp_path,
                                                                          capsys):
    """The README's path: data built with the model's Hugging Face tokenizer at the released length, then
    `evaluate --model EXPORT --data DIR` (the tokenizer named by its folder for one, its file for the
    other: the same tokenizer file either way)."""
    ckpt, file, folder, _ = released_with_tokenizer
    texts = sample_texts(300, seed=4)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    data = tmp_path / "data"
    assert data_cli(["build", "--out", str(data), "--input", str(docs), "--hf-tokenizer", str(folder), "--seq-len",
                     "1024", "--val-fraction", "0.3", "--samples-per-shard", "1", "--no-progress"]) == 0
    export = tmp_path / "export"
    assert convert_main(["reference", str(ckpt), "--out", str(export), "--tokenizer", str(file)]) == 0
    capsys.readouterr()
    assert evaluate_main(["--model", str(export), "--data", str(data), "--device", "cpu", "--batches", "1",
                          "--micro-batch", "1"]) == 0
    nelbo = float(capsys.readouterr().out.split("NELBO ")[1].split()[0])
    assert 0 < nelbo < 3 * math.log(300)
