"""Image data: the VQ tokenizer (LlamaGen VQ-16 layout), build-images (--vq, --digits), labelled loaders."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from pgm_dist.common.errors import DataError
from pgm_dist.data.__main__ import main as data_cli
from pgm_dist.data.loader import TrainLoader, ValidationLoader
from pgm_dist.data.shards import DataFolder, expand_sources, iter_shard, write_shard
from pgm_dist.images.data import digits_split
from pgm_dist.images.vq import VQ8, VQConfig, VQModel, infer_vq_config, load_vq

TINY = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                z_channels=8, num_res_blocks=1, norm_groups=4)
SIZE = 16  # pixels per side: a 4x4 grid of codes with TINY's two downsamplings


def tiny_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(TINY).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a weight that fails to load shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def save_llamagen_checkpoint(model: VQModel, path: Path) -> None:
    """As LlamaGen's train_vq saves: {"model": state_dict} with its codebook-usage buffer."""
    state = dict(model.state_dict())
    state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": state, "steps": torch.tensor(7)}, path)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def read_folder(out: Path) -> dict[int, tuple[np.ndarray, int, str]]:
    """Every sample of a built folder: source index -> (tokens, label, split)."""
    found = {}
    for split in ("train", "val"):
        for url in expand_sources(str(out / f"{split}-*.tar")):
            for key, tokens, label in iter_shard(url, labels=True):
                assert int(key) not in found
                found[int(key)] = (tokens, label, split)
    return found


def test_vq_state_dict_names_are_llamagen_vq16():
    """Names and shapes that LlamaGen's vq_ds16_c2i.pt holds (models/vq_model.py, VQ-16, 72M parameters)."""
    with torch.device("meta"):
        state = VQModel(VQConfig()).state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.1.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.4.res.2.norm2.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in state and "encoder.conv_blocks.4.downsample" not in state
    assert len(state) == 343  # LlamaGen's 344 less the training-only codebook_used buffer
    assert round(sum(v.numel() for v in state.values()) / 1e6, 1) == 71.9
    assert VQConfig().downsample == 16


def test_vq_blocks_follow_llamagen_formulas():
    """Each building block against its formula, written out here with plain tensor ops."""
    from pgm_dist.images.vq import AttnBlock, Downsample, ResnetBlock, Upsample

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
    norm = lambda t, m: F.group_norm(t, 4, m.weight, m.bias, eps=1e-6)  # noqa: E731
    with torch.no_grad():
        block = ResnetBlock(8, 12, groups=4)
        small = 0.01 * x  # a variance near GroupNorm's eps, so that its value (1e-6) shows
        h = F.conv2d(swish(norm(small, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1)
        h = F.conv2d(swish(norm(h, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1)
        shortcut = F.conv2d(small, block.nin_shortcut.weight, block.nin_shortcut.bias)
        torch.testing.assert_close(block(small), shortcut + h)

        attn = AttnBlock(8, groups=4)
        y = norm(x, attn.norm).flatten(2)  # [n, c, hw]
        q, k, v = (torch.einsum("oc,ncp->nop", m.weight[:, :, 0, 0], y) + m.bias[:, None]
                   for m in (attn.q, attn.k, attn.v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 8 ** -0.5, dim=2)  # [n, hw_q, hw_k]
        mixed = torch.bmm(v, weights.transpose(1, 2)).reshape(x.shape)
        expected = x + F.conv2d(mixed, attn.proj_out.weight, attn.proj_out.bias)
        torch.testing.assert_close(attn(x), expected)

        down = Downsample(8)  # zero padding on the right and bottom only, then a stride-2 conv
        padded = torch.zeros(2, 8, 7, 7)
        padded[:, :, :6, :6] = x
        torch.testing.assert_close(down(x), F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2))
        up = Upsample(8)
        nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_vq_checkpoint_round_trip_same_codes_and_pixels(tmp_path):
    model = tiny_vq()
    x = images(6)
    codes = model.encode(x)
    assert codes.shape == (6, 4, 4) and codes.unique().numel() > 3
    pixels = model.decode(codes)
    assert pixels.shape == (6, 3, SIZE, SIZE)

    save_llamagen_checkpoint(model, tmp_path / "vq.pt")
    loaded = load_vq(tmp_path / "vq.pt", TINY)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), pixels)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict loads too
    assert torch.equal(load_vq(tmp_path / "bare.pt", TINY).encode(x), codes)
    # A different random model gives other codes: the comparison above can fail.
    assert not torch.equal(tiny_vq(seed=5).encode(x), codes)

    from pgm_dist.images.vq import save_vq
    save_vq(loaded, tmp_path / "vq.safetensors")
    again = load_vq(tmp_path / "vq.safetensors")  # config from the file's metadata
    assert again.config == TINY
    assert torch.equal(again.encode(x), codes) and torch.equal(again.decode(codes), pixels)
    shown = again.decode_pixels(codes)
    assert shown.shape == (6, SIZE, SIZE, 3) and shown.min() >= 0 and shown.max() <= 1
    np.testing.assert_allclose(shown, ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())


def test_codes_are_the_nearest_normalised_codebook_entry():
    model = tiny_vq()
    x = images(4, seed=3)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)  # [N, h, w, 4]
        book = model.quantize.embedding.weight
        book = book / book.norm(dim=-1, keepdim=True)
        z = z / z.norm(dim=-1, keepdim=True)
        distance = ((z[..., None, :] - book) ** 2).sum(-1)  # [N, h, w, K]
        expected = distance.argmin(-1)
        # The decoder sees the normalised entries of the codes.
        decoded = model.decoder(model.post_quant_conv(book[expected].permute(0, 3, 1, 2)))
    assert torch.equal(model.encode(x), expected)
    assert torch.equal(model.decode(expected), decoded)
    # The raw (unnormalised) codebook would pick other codes: normalisation matters here.
    raw = model.quantize.embedding.weight
    assert not torch.equal((z[..., None, :] - raw).pow(2).sum(-1).argmin(-1), expected)


def write_image_folder(root: Path) -> list[tuple[Path, int]]:
    """Two classes of PNGs at SIZE x SIZE, plus one wider picture whose central square is the content."""
    rng = np.random.default_rng(0)
    files = []
    for label, name in enumerate(["ant", "bee"]):  # sorted: the class index
        (root / name).mkdir(parents=True)
        for i in range(7):
            path = root / name / f"{i:02d}.png"
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
            files.append((path, label))
    wide = rng.integers(0, 256, (SIZE, SIZE + 6, 3), dtype=np.uint8)
    Image.fromarray(wide).save(root / "bee" / "99-wide.png")
    files.append((root / "bee" / "99-wide.png", 1))
    (root / "bee" / "notes.txt").write_text("not a picture: left out")
    return files


def picture_tensor(path: Path) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    h, w, _ = pixels.shape
    top, left = (h - SIZE) // 2, (w - SIZE) // 2
    return torch.from_numpy(pixels[top:top + SIZE, left:left + SIZE]).permute(2, 0, 1) / 127.5 - 1


def test_build_images_vq_tokens_equal_encode(tmp_path, capsys):
    model = tiny_vq()
    save_llamagen_checkpoint(model, tmp_path / "vq.pt")
    files = write_image_folder(tmp_path / "pics")
    out = tmp_path / "out"
    argv = ["build-images", "--vq", str(tmp_path / "vq.pt"), "--input", str(tmp_path / "pics"), "--out", str(out),
            "--image-size", str(SIZE), "--vq-config", json.dumps(TINY.to_dict()), "--batch-size", "4",
            "--no-progress"]
    assert data_cli(argv) == 0

    found = read_folder(out)
    assert sorted(found) == list(range(len(files)))
    expected = model.encode(torch.stack([picture_tensor(p) for p, _ in files]))
    for i, (path, label) in enumerate(files):
        tokens, got_label, split = found[i]
        assert tokens[0] == TINY.codebook_size, path
        np.testing.assert_array_equal(tokens[1:], expected[i].reshape(-1).numpy(), err_msg=str(path))
        assert got_label == label and split == ("val" if i % 10 == 0 else "train")

    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 33 and meta["seq_len"] == 17 and meta["special_ids"] == {"bos": 32}
    assert meta["image"] == {"grid": [4, 4], "codebook_size": 32, "num_classes": 2, "class_names": ["ant", "bee"],
                             "source": "vq", "vq": TINY.to_dict()}
    assert meta["train"]["samples"] + meta["val"]["samples"] + meta["dropped_blocks"] == len(files)

    folder = DataFolder.open(out, seq_len=17, vocab_size=33)  # no tokenizer.model needed
    assert folder.is_image
    decoder = load_vq(folder.vq_path)
    assert torch.equal(decoder.decode(expected), model.decode(expected))

    assert data_cli(argv) == 0  # same inputs: reused, not rebuilt
    assert "up to date" in capsys.readouterr().out
    folder.vq_path.unlink()
    with pytest.raises(DataError, match="vq.safetensors is missing"):
        DataFolder.open(out)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits"
    assert data_cli(["build-images", "--digits", "--out", str(out)]) == 0
    return out


def test_digits_shards_hold_load_digits(digits_folder):
    reference = load_digits()
    found = read_folder(digits_folder)
    meta = json.loads((digits_folder / "meta.json").read_text())
    assert meta["vocab_size"] == 18 and meta["seq_len"] == 65 and meta["special_ids"] == {"bos": 17}
    assert meta["image"] == {"grid": [8, 8], "codebook_size": 17, "num_classes": 10,
                             "class_names": [str(c) for c in range(10)], "source": "digits", "vq": None}
    assert meta["dtype"] == "uint16" and meta["samples_per_shard"] == 1617 // 64
    val = [i for i in range(1797) if i % 10 == 0]
    assert sorted(i for i, (_, _, s) in found.items() if s == "val") == val
    assert meta["train"]["samples"] == 1600 and meta["val"]["samples"] == 180 and meta["dropped_blocks"] == 17
    assert len(found) == 1780
    for i, (tokens, label, _) in found.items():
        assert tokens.dtype == np.uint16 and tokens[0] == 17
        np.testing.assert_array_equal(tokens[1:], reference.images[i].reshape(-1))
        assert label == reference.target[i]
    first_shard = [int(key) for key, _, _ in iter_shard(str(digits_folder / "train-000000.tar"), labels=True)]
    assert first_shard != sorted(first_shard)  # train pictures are written shuffled

    (train_x, train_y), (val_x, val_y) = digits_split()
    np.testing.assert_array_equal(val_x, reference.images[val].astype(np.int64))
    np.testing.assert_array_equal(val_y, reference.target[val])
    assert len(train_x) == len(train_y) == 1617 and not set(map(bytes, train_x)) & set(map(bytes, val_x))


def test_loaders_yield_tokens_and_labels_and_resume(digits_folder):
    reference = load_digits()
    label_of = {}
    for image, target in zip(reference.images.astype(np.int64), reference.target):
        label_of.setdefault(image.tobytes(), set()).add(int(target))
    folder = DataFolder.open(digits_folder, seq_len=65, vocab_size=18)

    def loader():
        return TrainLoader(folder.train_sources, seq_len=65, micro_batch=4, num_workers=2, shuffle_shards=2,
                           samples_per_shard=folder.meta.samples_per_shard, labels=folder.is_image)

    straight, first = [], loader()
    for batch in first:
        straight.append(batch)
        if len(straight) == 5:
            state = first.state_dict()
        if len(straight) == 9:
            break
    for tokens, labels in straight:
        assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == (4, 65) and labels.shape == (4,)
        for row, label in zip(tokens, labels):
            assert int(label) in label_of[row[1:].numpy().reshape(8, 8).tobytes()]
    resumed = loader()
    resumed.load_state_dict(state)
    for (tokens, labels), (want_tokens, want_labels) in zip(resumed, straight[5:]):
        assert torch.equal(tokens, want_tokens) and torch.equal(labels, want_labels)

    batches = list(ValidationLoader(folder.val_sources, seq_len=65, micro_batch=64, labels=True))
    assert [len(labels) for _, labels in batches] == [64, 64, 52]
    labels = torch.cat([labels for _, labels in batches])
    tokens = torch.cat([tokens for tokens, _ in batches])
    assert torch.equal(labels, torch.as_tensor(reference.target[::10]))
    assert torch.equal(tokens[:, 1:], torch.as_tensor(reference.images[::10].reshape(-1, 64), dtype=torch.int64))
    text = next(iter(ValidationLoader(folder.val_sources, seq_len=65, micro_batch=4)))
    assert isinstance(text, torch.Tensor) and text.shape == (4, 65)  # without labels=True: tokens only


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    model = tiny_vq()
    save_llamagen_checkpoint(model, tmp_path / "vq.pt")
    config = json.dumps(TINY.to_dict())

    def fails(argv, message):
        assert data_cli(["build-images", "--out", str(tmp_path / "out"), "--no-progress", *argv]) == 2
        assert message in capsys.readouterr().err

    pics = tmp_path / "pics"
    pics.mkdir()
    base = ["--vq", str(tmp_path / "vq.pt"), "--input", str(pics), "--vq-config", config, "--image-size", "16"]
    fails(base, "has no class sub-folders")
    (pics / "a").mkdir()
    fails(base, "holds no pictures")
    for name in ("a0.png", "a1.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(pics / "a" / name)
    (pics / "a" / "x.png").write_bytes(b"not a png")
    fails(base, "x.png is not a readable picture")
    (pics / "a" / "x.png").unlink()
    fails(base[:-1] + ["10"], "not a multiple of the VQ model's downsampling factor 4")
    with_config = ["--vq", str(tmp_path / "vq.pt"), "--input", str(pics), "--vq-config"]
    fails(with_config + [json.dumps({**TINY.to_dict(), "codebook_size": 64})],
          "32 x 4 codebook but the VQ config says 64 x 4")
    fails(with_config + [json.dumps({**TINY.to_dict(), "ch": 16})], "does not match the VQ config")
    fails(with_config + ['{"codebook": 3}'], "unknown VQ config field(s) codebook")
    fails(["--vq", str(tmp_path / "vq.pt")], "--vq needs --input")
    fails(["--vq", str(tmp_path / "nothing.pt"), "--input", str(pics)], "nothing.pt does not exist")
    fails(["--vq", str(tmp_path / "vq.pt"), "--input", str(tmp_path / "nowhere")], "nowhere does not exist")
    fails(["--digits", "--input", str(pics)], "go with --vq, not --digits")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    fails(["--vq", str(tmp_path / "pickled.pt"), "--input", str(pics), "--vq-config", config],
          "holds objects other than tensors")
    assert not (tmp_path / "out" / "meta.json").exists()

    write_shard(tmp_path / "text.tar", [("k", np.arange(5, dtype=np.uint16))])
    with pytest.raises(ValueError, match="no integer label.npy scalar: not an image shard"):
        list(iter_shard(str(tmp_path / "text.tar"), labels=True))


@pytest.mark.parametrize("config", [VQ8, VQConfig(), TINY], ids=["VQ-8", "VQ-16", "tiny"])
def test_the_vq_config_is_inferred_from_a_llamagen_state_dict(config, tmp_path):
    """VQ-8 (the paper's: 4 levels, 256 px -> 32 x 32) and VQ-16 from their keys' shapes alone; a LlamaGen
    file then loads without --vq-config (GroupNorm's groups are not in the weights: given for the tiny one)."""
    with torch.device("meta"):
        state = VQModel(config).state_dict()
    assert infer_vq_config(state, norm_groups=config.norm_groups) == config
    assert VQ8.downsample == 8 and VQConfig().downsample == 16
    if config is TINY:
        torch.save({"model": VQModel(TINY).state_dict()}, tmp_path / "vq.pt")
        with pytest.raises(ValueError, match="must be multiples of norm_groups"):
            load_vq(tmp_path / "vq.pt")  # inferred with LlamaGen's 32 groups: the tiny widths do not divide
        assert load_vq(tmp_path / "vq.pt", TINY).config == TINY


@pytest.mark.parametrize("width, height", [(250, 200), (200, 250), (256, 256), (120, 90)])
def test_pictures_are_prepared_as_the_reference_resize_then_centre_crop(width, height, tmp_path):
    """torchvision's Resize(256) + CenterCrop(256): the short side to 256, the long to int(256 long / short),
    then the central square at a rounded offset. A horizontal ramp (value = 0.5 x + 30 at column x) and a
    vertical one say where each output pixel came from: output column j samples the source at
    (left + j + 0.5) * (width / new_width) - 0.5 (bilinear, pixel centres)."""
    from PIL import Image

    from pgm_dist.images.data import load_picture

    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([0.5 * xs + 30, 0.5 * ys + 30, np.full_like(xs, 100.0)], -1)
    Image.fromarray(rgb.round().astype(np.uint8)).save(tmp_path / "ramp.png")
    out = load_picture(tmp_path / "ramp.png", 256)
    assert out.shape == (3, 256, 256) and out.dtype == torch.float32
    values = (out.numpy() + 1) * 127.5
    short = min(width, height)
    new_w, new_h = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
    left, top = round((new_w - 256) / 2), round((new_h - 256) / 2)
    cols = (left + np.arange(256) + 0.5) * (width / new_w) - 0.5
    rows = (top + np.arange(256) + 0.5) * (height / new_h) - 0.5
    inner = slice(8, -8)  # away from the borders, where the filter is clamped
    np.testing.assert_allclose(values[0, 128, inner], (0.5 * cols + 30)[inner], atol=1.01)
    np.testing.assert_allclose(values[1, inner, 128], (0.5 * rows + 30)[inner], atol=1.01)
    np.testing.assert_allclose(values[2], 100, atol=0.01)
    assert short == 256 or (new_w, new_h) != (width, height)


def test_the_resize_is_bilinear_not_bicubic(tmp_path):
    """A sharp edge: the reference's bilinear filter never leaves the two levels; a bicubic one rings
    (overshoots) beside the edge."""
    from PIL import Image

    from pgm_dist.images.data import load_picture

    step = np.full((400, 600, 3), 50, np.uint8)
    step[:, 301:] = 200
    Image.fromarray(step).save(tmp_path / "edge.png")
    values = (load_picture(tmp_path / "edge.png", 256).numpy() + 1) * 127.5
    assert values.min() >= 50 - 0.01 and values.max() <= 200 + 0.01
    assert len(np.unique(values.round())) > 2  # the edge is filtered, not nearest-neighbour
    bicubic = np.asarray(Image.fromarray(step).resize((384, 256), Image.Resampling.BICUBIC), np.float32)
    assert bicubic.min() < 50 or bicubic.max() > 200  # what the test tells apart


def test_val_input_is_the_validation_split_and_nothing_is_held_out_of_the_input(tmp_path, capsys):
    """--val-input (ImageNet-val's role): its pictures, labelled by the same class names, are the val
    split; every --input picture is trained on (none of every tenth held out)."""
    model = tiny_vq()
    save_llamagen_checkpoint(model, tmp_path / "vq.pt")
    train_files = write_image_folder(tmp_path / "pics")
    val_files = write_image_folder(tmp_path / "val")[3:9]  # both classes
    for path in (tmp_path / "val").rglob("*.png"):
        if path not in {p for p, _ in val_files}:
            path.unlink()
    out = tmp_path / "out"
    base = ["build-images", "--vq", str(tmp_path / "vq.pt"), "--input", str(tmp_path / "pics"), "--image-size",
            str(SIZE), "--vq-config", json.dumps(TINY.to_dict()), "--no-progress", "--samples-per-shard", "3"]
    assert data_cli([*base, "--out", str(out), "--val-input", str(tmp_path / "val")]) == 0
    found = read_folder(out)
    val = sorted(found[i][1:] for i in found if found[i][2] == "val")
    assert val == sorted((label, "val") for _, label in val_files)
    train = [i for i in found if found[i][2] == "train"]
    meta = json.loads((out / "meta.json").read_text())
    assert len(train) + meta["dropped_blocks"] == len(train_files) and max(train) < len(train_files)
    expected = model.encode(torch.stack([picture_tensor(p) for p, _ in val_files]))
    got = sorted((found[i][0][1:].tolist(), found[i][1]) for i in found if found[i][2] == "val")
    assert got == sorted((e.reshape(-1).tolist(), label) for e, (_, label) in zip(expected, val_files))
    (tmp_path / "val" / "bee").rename(tmp_path / "val" / "wasp")
    assert data_cli([*base, "--out", str(tmp_path / "other"), "--val-input", str(tmp_path / "val")]) == 2
    assert "does not have the class sub-folders of" in capsys.readouterr().err
