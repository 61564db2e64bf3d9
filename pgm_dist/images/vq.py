"""The VQ image tokenizer of LlamaGen (``VQ-16``): conv encoder -> l2-normalised codebook -> conv decoder.

An image ``[N, 3, H, W]`` in [-1, 1] becomes a grid of codes ``[N, H/f, W/f]`` with
``f = 2 ** (len(encoder_ch_mult) - 1)`` (16 for the default ``(1, 1, 2, 2, 4)``); a code is
the codebook entry nearest to the encoder's feature after both are l2-normalised (cosine
nearest neighbour). Module and parameter names follow LlamaGen's ``VQModel`` so that its
published checkpoints (``{"model": state_dict}``) load unchanged; only inference is built
here (no losses, no training-time codebook-usage buffer).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pgm_dist.models.config import config_from_dict

# LlamaGen's training-time ring buffer of recently used codes: not needed to encode or decode.
USAGE_BUFFER_KEY = "quantize.codebook_used"
CONFIG_METADATA_KEY = "vq_config"
NEAREST_CHUNK = 4096  # feature vectors per distance matrix: bounds its memory to chunk x codebook floats


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ-16 by default (``vq_ds16_c2i.pt``); ``encoder_ch_mult=(1, 2, 2, 4)`` and the
    same decoder multipliers make its VQ-8."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    norm_groups: int = 32  # GroupNorm groups; LlamaGen fixes 32, small test models need fewer

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same number of levels "
                             "(the decoder undoes the encoder's downsampling)")
        if min(self.codebook_size, self.codebook_embed_dim, self.ch, self.z_channels, self.num_res_blocks,
               self.norm_groups, *self.encoder_ch_mult, *self.decoder_ch_mult) < 1:
            raise ValueError(f"every VQ size must be at least 1: {self}")
        widths = {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult} | {self.ch}
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"the VQ channel widths {sorted(widths)} must be multiples of norm_groups "
                             f"({self.norm_groups})")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "VQConfig":
        return config_from_dict(cls, values, "VQ config")


# LlamaGen's VQ-8 (``vq_ds8_c2i.pt``): 256 px -> 32 x 32 codes of 16,384, the paper's image tokenizer.
VQ8 = VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(n, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c], scale 1/sqrt(c)
        return x + self.proj_out(out.transpose(2, 3).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only: halves even sizes exactly


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks (with attention at the coarsest level) and a resampler."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, groups: int, attention: bool,
                 resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(blocks if attention else 0))
        if resample == "down":
            self.downsample = Downsample(out_ch)
        elif resample == "up":
            self.upsample = Upsample(out_ch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def middle(ch: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)])


class Encoder(nn.Module):
    """``[N, 3, H, W]`` -> ``[N, z_channels, H/f, W/f]``."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, g = cfg.encoder_ch_mult, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in mult]
        last = len(mult) - 1
        self.conv_blocks = nn.ModuleList(
            Level(widths[i], widths[i + 1], cfg.num_res_blocks, g, attention=i == last,
                  resample="down" if i != last else None) for i in range(len(mult)))
        self.mid = middle(widths[-1], g)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for module in (*self.conv_blocks, *self.mid):
            h = module(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """``[N, z_channels, h, w]`` -> ``[N, 3, h*f, w*f]``; levels run coarsest first, one more
    residual block per level than the encoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, g = cfg.decoder_ch_mult, cfg.norm_groups
        top = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = middle(top, g)
        levels, width = [], top
        for i in reversed(range(len(mult))):
            out = cfg.ch * mult[i]
            levels.append(Level(width, out, cfg.num_res_blocks + 1, g, attention=i == len(mult) - 1,
                                resample="up" if i != 0 else None))
            width = out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for module in (*self.mid, *self.conv_blocks):
            h = module(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """The codebook ``[codebook_size, embed_dim]`` (LlamaGen's ``quantize.embedding``)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [M, embed_dim]`` -> index of the nearest codebook entry ``[M]`` (squared L2)."""
        book = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        book_sq = (book ** 2).sum(-1)
        # |z|^2 is the same for every entry, so the argmin needs only |e|^2 - 2 z.e
        return torch.cat([(book_sq - 2 * chunk @ book.T).argmin(-1) for chunk in z.split(NEAREST_CHUNK)])


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [-1, 1] -> pre-quantisation features ``[N, embed_dim, H/f, W/f]``."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [-1, 1], H and W multiples of ``downsample`` -> codes ``LongTensor[N, h, w]``."""
        f = self.config.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"VQ encode takes images [N, 3, H, W] with H and W multiples of {f}, "
                             f"got {tuple(images.shape)}")
        z = self.features(images)
        n, c, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, h, w]`` -> images ``[N, 3, h*f, w*f]`` (nominally in [-1, 1], not clamped)."""
        if codes.ndim != 3:
            raise ValueError(f"VQ decode takes codes [N, h, w], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), "
                             f"got {int(codes.min())}..{int(codes.max())}")
        quant = self.quantize.codebook()[codes].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(quant))

    def decode_pixels(self, codes: torch.Tensor) -> np.ndarray:
        """Codes ``[N, h, w]`` -> pixels ``float32 [N, h*f, w*f, 3]`` in [0, 1], for pictures."""
        images = self.decode(codes.to(self.quant_conv.weight.device))
        return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a torch checkpoint: LlamaGen's ``{"model": state_dict, ...}`` or a bare one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors, which weights_only loading refuses "
                         f"({str(err).splitlines()[0]}); re-save just its state dict: "
                         "torch.save({'model': checkpoint['model']}, path)") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} is neither a state dict nor a {{'model': state_dict}} checkpoint")
    return checkpoint


def infer_vq_config(state: dict[str, torch.Tensor], norm_groups: int = 32) -> VQConfig:
    """The VQ config a LlamaGen state dict's shapes give: codebook, base width, each level's width
    (VQ-8: 4 levels (1, 2, 2, 4), VQ-16: 5 (1, 1, 2, 2, 4)), latent channels, resnet blocks per level.
    GroupNorm's group count is not in the weights: LlamaGen's 32."""
    def levels(prefix: str) -> list[int]:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.res\.0\.conv1\.weight$")
        found = {int(m[1]) for key in state if (m := pattern.match(key))}
        return [state[f"{prefix}{i}.res.0.conv1.weight"].shape[0] for i in sorted(found)]
    try:
        codebook, dim = state["quantize.embedding.weight"].shape
        ch = state["encoder.conv_in.weight"].shape[0]
        z_channels = state["encoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a LlamaGen VQ state dict: no {err.args[0]}") from None
    encoder, decoder = levels("encoder.conv_blocks."), levels("decoder.conv_blocks.")
    blocks = len({key.split(".")[4] for key in state if key.startswith("encoder.conv_blocks.0.res.")})
    return VQConfig(codebook_size=codebook, codebook_embed_dim=dim, ch=ch,
                    encoder_ch_mult=tuple(w // ch for w in encoder),
                    decoder_ch_mult=tuple(w // ch for w in decoder[::-1]),
                    z_channels=z_channels, num_res_blocks=blocks, norm_groups=norm_groups)


def load_vq(path: str | os.PathLike, config: VQConfig | None = None) -> VQModel:
    """A VQ model in eval mode from a LlamaGen torch checkpoint (read with ``weights_only``; its config
    inferred from the shapes when ``config`` is None: VQ-8 and VQ-16 alike) or from :func:`save_vq`'s
    safetensors (whose own config is used when ``config`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(path)
        if config is None:
            with safe_open(path, "pt") as f:
                saved = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
            if saved is None:
                raise ValueError(f"{path} carries no VQ config: pass one")
            config = VQConfig.from_dict(json.loads(saved))
    else:
        state = _checkpoint_state(path)
        config = config or infer_vq_config(state)
    state.pop(USAGE_BUFFER_KEY, None)
    book = state.get("quantize.embedding.weight")
    expected = (config.codebook_size, config.codebook_embed_dim)
    if book is not None and tuple(book.shape) != expected:
        raise ValueError(f"{path} has a {tuple(book.shape)[0]} x {tuple(book.shape)[1]} codebook but the VQ config "
                         f"says {expected[0]} x {expected[1]}: pass the config it was trained with (--vq-config)")
    model = VQModel(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or misshapen weights: torch lists them all
        raise ValueError(f"{path} does not match the VQ config {config.to_dict()}: {str(err)[:800]}") from None
    return model.eval()


def save_vq(model: VQModel, path: str | os.PathLike) -> None:
    """Weights as safetensors with the config in the file's metadata; written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})
    os.replace(tmp, path)
