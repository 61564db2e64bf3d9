"""Typed model configuration with named presets.

Vocabulary size and sequence length come from the data, never from a preset:
``ModelConfig.preset("pgm-small", vocab_size=V, seq_len=L)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHITECTURES = ("pgm", "mdlm")
ATTENTION_BACKENDS = ("auto", "reference", "flex", "triton")
REGISTER_ORDERS = ("reference", "legacy")


def config_from_dict(cls, values: dict, what: str):
    """``cls(**values)`` for a dataclass config, refusing unknown keys with the valid ones listed."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return cls(**values)


@dataclass
class ModelConfig:
    arch: str = "pgm"  # "pgm" or "mdlm"
    vocab_size: int = 0  # tokens of the tokenizer (MDLM adds one MASK id after them)
    seq_len: int = 0
    d_model: int = 128
    n_heads: int = 2
    n_enc: int = 2  # PGM encoder blocks; for MDLM the number of blocks
    n_dec: int = 2  # PGM decoder blocks; unused by MDLM
    mlp_ratio: int = 4
    cond_dim: int = 128  # width of the adaLN conditioning vector
    dropout: float = 0.1
    rope_base: float = 10000.0
    num_classes: int | None = None  # class-conditional adaLN (images); None = text
    # Images (section 9): one learned register token per group, prepended (positions shift by 2);
    # the adaLN linears read the raw conditioning (no SiLU), as the reference's image model;
    # image_grid (h, w) of the 1 + h*w sequence, from the data.
    registers: bool = False
    # Where the registers sit (positions 0 and 1): "reference" = group 1's at 0, group 0's at 1, as the
    # reference's image model (so its released weights keep their function under RoPE); "legacy" = group
    # 0's at 0, group 1's at 1, the order of image models written before this field (from_dict keeps it).
    register_order: str = "reference"
    cond_silu: bool = True
    image_grid: list | None = None
    # The GroupSwap's query, key/value and output projections with biases, as the reference's (models
    # converted from its checkpoints, pgm_dist.checkpoints.reference); ours train without.
    swap_bias: bool = False
    attention: str = "auto"
    # Runtime options (how, not what, is computed; a checkpoint resumes under other values):
    loss_chunk: int = 1024  # tokens per chunk of the output projection + cross-entropy (0: all at once)
    # chunks' gradients made in the forward pass (models/linear_ce.py); False: recomputed in backward
    fused_loss: bool = True
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    bos_id: int = 1
    eos_id: int = 2
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attention!r}; valid: {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.image_grid is not None:
            self.image_grid = [int(n) for n in self.image_grid]
            if len(self.image_grid) != 2 or self.seq_len != 1 + self.image_grid[0] * self.image_grid[1]:
                raise ValueError(f"image_grid {self.image_grid} must be (h, w) with seq_len = 1 + h*w "
                                 f"(got seq_len {self.seq_len})")
        if self.register_order not in REGISTER_ORDERS:
            raise ValueError(f"unknown register_order {self.register_order!r}; valid: {', '.join(REGISTER_ORDERS)}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 tokens (0: unchunked), got {self.loss_chunk}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mask_id(self) -> int:
        """The MDLM MASK token: one id past the tokenizer's vocabulary."""
        return self.vocab_size

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, seq_len: int, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
        valid = {f.name for f in dataclasses.fields(cls)} - {"preset_name"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        if vocab_size <= 0 or seq_len <= 0:
            raise ValueError(f"vocab_size and seq_len must be positive, got {vocab_size} and {seq_len}")
        values = {**PRESETS[name], **overrides}
        return cls(vocab_size=vocab_size, seq_len=seq_len, preset_name=name, **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        if values.get("registers") and "register_order" not in values:  # written before the field existed
            values = {**values, "register_order": "legacy"}
        return config_from_dict(cls, values, "ModelConfig")


# Head dim 64 everywhere, as in every configuration of the papers.
PRESETS: dict[str, dict] = {
    "pgm-tiny": dict(arch="pgm", n_enc=2, n_dec=2, d_model=128, n_heads=2),
    "pgm-small": dict(arch="pgm", n_enc=6, n_dec=6, d_model=768, n_heads=12),
    "pgm-8-8": dict(arch="pgm", n_enc=8, n_dec=8, d_model=768, n_heads=12),
    "pgm-6-6-d1024": dict(arch="pgm", n_enc=6, n_dec=6, d_model=1024, n_heads=16),
    "mdlm-tiny": dict(arch="mdlm", n_enc=4, n_dec=0, d_model=128, n_heads=2),
    "mdlm-small": dict(arch="mdlm", n_enc=12, n_dec=0, d_model=768, n_heads=12),
    # Scale-out presets (ZeRO-2/3, see `python -m pgm_dist.memory`); each MDLM twin has the same
    # width and total depth: ~430M (GPT-2 medium's shape) and ~1.1B parameters at V 50,258.
    "pgm-medium": dict(arch="pgm", n_enc=12, n_dec=12, d_model=1024, n_heads=16),
    "mdlm-medium": dict(arch="mdlm", n_enc=24, n_dec=0, d_model=1024, n_heads=16),
    "pgm-1b": dict(arch="pgm", n_enc=16, n_dec=16, d_model=1536, n_heads=24),
    "mdlm-1b": dict(arch="mdlm", n_enc=32, n_dec=0, d_model=1536, n_heads=24),
    # Class-conditional image PGMs on token grids (section 9): registers, conditioning of width d
    # without SiLU; grid, codebook and classes come from the image data folder. pgm-img-b is the
    # reference's ImageNet model (d 1024, 16 heads, 12 + 12; its data: 32x32 codes of 16,384, 1000
    # classes); pgm-img-tiny fits the built-in digits (8x8 grey levels, 17 codes, 10 classes) on a CPU.
    "pgm-img-tiny": dict(arch="pgm", n_enc=2, n_dec=2, d_model=128, n_heads=2, cond_dim=128, dropout=0.0,
                         registers=True, cond_silu=False),
    "pgm-img-b": dict(arch="pgm", n_enc=12, n_dec=12, d_model=1024, n_heads=16, cond_dim=1024,
                      registers=True, cond_silu=False),
    # the reference's other ImageNet model (images_pgm_14_10_100epochs.ckpt): the same width, 14 + 10
    "pgm-img-b-14-10": dict(arch="pgm", n_enc=14, n_dec=10, d_model=1024, n_heads=16, cond_dim=1024,
                            registers=True, cond_silu=False),
}
IMAGE_PRESETS = tuple(name for name, values in PRESETS.items() if values.get("registers"))
