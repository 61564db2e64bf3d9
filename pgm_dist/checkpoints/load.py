"""Loading a trained model without DeepSpeed: from an export, a checkpoint, a run folder, or one of
the authors' released checkpoint files (converted in memory: pgm_dist/checkpoints/reference.py)."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pgm_dist.checkpoints.format import EMA_FILE, MARKER, complete_checkpoints, read_state
from pgm_dist.checkpoints.reference import RELEASE_LENGTH, is_reference_checkpoint, load_reference
from pgm_dist.common.files import write_json_atomic
from pgm_dist.data.default import DEFAULT_DATA
from pgm_dist.data.shards import TOKENIZER_FILE, VQ_FILE
from pgm_dist.data.tokenizer import Tokenizer, tokenizer_file
from pgm_dist.images.vq import VQ8
from pgm_dist.models import build_model
from pgm_dist.models.config import ModelConfig

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
# the tokenizer of the released text models (GPT-2's, MASK id 50,257 after it)
REFERENCE_TOKENIZER = "gpt2"
REFERENCE_VQ = VQ8  # the released image models' codes: LlamaGen's VQ-8 (vq_ds8_c2i.pt)


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, EMA weights
    config: ModelConfig
    tokenizer: Tokenizer | None  # None for image models
    source: Path  # the export or checkpoint folder read
    info: dict  # export config.json or checkpoint pgm_state.json


def resolve_model_dir(path: str | Path) -> Path:
    """An export folder, a checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / EXPORT_WEIGHTS).is_file() or (path / MARKER).is_file():
        return path
    done = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if done:
        return done[-1]
    raise FileNotFoundError(f"{path} is neither an export (with {EXPORT_WEIGHTS}), nor a complete checkpoint "
                            f"(with {MARKER}), nor a run folder holding one")


def training_data_folder(info: dict) -> Path | None:
    """The data folder a model was trained on, as its checkpoint's ``pgm_state.json`` (the run's
    ``--data``, else the built-in corpus's folder) or its export's ``config.json`` records it.
    A relative path is relative to where training ran; None for an export that predates the record."""
    if "train_config" in info:
        return Path(info["train_config"].get("data") or DEFAULT_DATA)
    return Path(info["data"]) if info.get("data") else None


def is_export(source: Path) -> bool:
    return (source / EXPORT_WEIGHTS).is_file()


def read_info(source: Path) -> dict:
    """What a model folder says of itself: an export's ``config.json`` or a checkpoint's
    ``pgm_state.json`` (both hold ``model_config`` and ``tokenizer_sha256``)."""
    return json.loads((source / EXPORT_CONFIG).read_text()) if is_export(source) else read_state(source)


def reference_tokenizer(spec: str | Path | None, config: ModelConfig, source: str, out: Path | None = None
                        ) -> Tokenizer:
    """The tokenizer ``spec`` names (default GPT-2's), written to ``out`` (default: a temporary file, the
    Tokenizer keeps what it read) and checked against a converted model's vocabulary."""
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            return reference_tokenizer(spec, config, source, Path(tmp) / TOKENIZER_FILE)
    tokenizer = tokenizer_file(spec or REFERENCE_TOKENIZER, out)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer {spec or REFERENCE_TOKENIZER} has {tokenizer.vocab_size} ids, the model "
                         f"{source} reads {config.vocab_size} (+ MASK): pass the tokenizer it was trained with "
                         "(--tokenizer)")
    return tokenizer


def load_reference_model(path: str | Path, device: str | torch.device = "cpu", attention: str | None = None,
                         tokenizer: str | Path | None = None, weights: str = "auto",
                         seq_len: int = RELEASE_LENGTH, tokenizer_out: Path | None = None) -> LoadedModel:
    """A released checkpoint file, converted in memory; a text model's tokenizer is ``tokenizer``
    (default GPT-2's; its file written to ``tokenizer_out`` when given), an image model's codes are
    LlamaGen VQ-8's (its decoder: ``convert --vq``)."""
    config, state, reference = load_reference(path, weights, seq_len)
    if attention is not None:
        config.attention = attention
    model = build_model(config)
    model.load_state_dict(state)
    info = {"model_config": config.to_dict(), "step": reference["global_step"], "reference": reference}
    codec = None
    if config.image_grid is None:
        codec = reference_tokenizer(tokenizer, config, str(path), tokenizer_out)
        config.bos_id, config.eos_id = codec.bos_id, codec.eos_id
        info.update(model_config=config.to_dict(), tokenizer_sha256=codec.sha256)
    else:
        info.update(tokenizer_sha256=None, data_meta={"image": {
            "grid": config.image_grid, "codebook_size": config.vocab_size - 1, "num_classes": config.num_classes,
            "class_names": None, "source": "vq", "vq": REFERENCE_VQ.to_dict()}})
    return LoadedModel(model.to(device).eval(), config, codec, Path(path), info)


def load_model(path: str | Path, device: str | torch.device = "cpu", attention: str | None = None,
               tokenizer: str | Path | None = None) -> LoadedModel:
    """An export, a checkpoint, a run folder, or a released reference file (a text file's EMA weights
    with ``tokenizer``, a Hugging Face name or file, default GPT-2's; an image file's raw weights, all
    it holds). Eval mode, on ``device``."""
    if is_reference_checkpoint(path):
        return load_reference_model(path, device, attention, tokenizer)
    source = resolve_model_dir(path)
    info = read_info(source)
    weights = load_file(str(source / (EXPORT_WEIGHTS if is_export(source) else EMA_FILE)))
    config = ModelConfig.from_dict(info["model_config"])
    if attention is not None:
        config.attention = attention
    model = build_model(config)
    model.load_state_dict(weights)
    tokenizer = None
    if config.image_grid is None:  # image models decode codes to pixels: no tokenizer
        tokenizer = Tokenizer(source / TOKENIZER_FILE)
        if tokenizer.sha256 != info["tokenizer_sha256"]:
            raise ValueError(f"{source / TOKENIZER_FILE} is not the tokenizer this model was trained with")
    return LoadedModel(model.to(device).eval(), config, tokenizer, source, info)


def save_export(out: Path, state: dict[str, torch.Tensor], info: dict) -> Path:
    """An export folder's weights and ``config.json`` (its tokenizer or VQ file is the caller's)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / EXPORT_WEIGHTS))
    write_json_atomic(out / EXPORT_CONFIG, info)
    return out


def image_decoder_path(loaded: LoadedModel) -> Path | None:
    """The VQ weights that turn an image model's codes into pixels: the export's copy, else the
    training data folder's; None for the digits (grey levels need no decoder). Raises
    FileNotFoundError when a VQ model's weights are in neither place."""
    image = (loaded.info.get("data_meta") or {}).get("image") or {}
    if image.get("vq") is None:
        return None
    if loaded.source.is_file():  # a released file, converted in memory: no folder beside it holds a decoder
        raise FileNotFoundError(f"{loaded.source} has no VQ decoder: convert it with its VQ first, `python -m "
                                f"pgm_dist.convert reference {loaded.source} --vq vq_ds8_c2i.pt --out DIR`, then "
                                "pass DIR")
    candidates = [loaded.source / VQ_FILE]
    data = training_data_folder(loaded.info)
    if data is not None:
        candidates.append(data / VQ_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the VQ decoder of {loaded.source} is in none of {', '.join(map(str, candidates))}: "
                            "export the model where its image data folder is, or copy vq.safetensors beside it")
