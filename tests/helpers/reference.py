"""Checkpoints in the layout of the authors' released text files (``jdeschena/pgm``), made here with
random tensors: every key name, shape and order as the reference's Lightning module writes them,
every parameter perturbed (norm weights away from 1, biases non-zero), at a reduced width.

The layout (``state_dict`` under ``backbone.``, the rotary buffer, ``ema.shadow_params`` in
``backbone.parameters()`` order, the run's config and tokenizer pickled as objects of classes the
reader does not have) is described in ``pgm_dist/checkpoints/reference.py``.
"""
from __future__ import annotations

import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch


def _block(d: int, c: int, mlp: int) -> list[tuple[str, tuple]]:
    return [("norm1.weight", (d,)), ("attn_qkv.weight", (3 * d, d)), ("attn_out.weight", (d, d)),
            ("norm2.weight", (d,)), ("mlp.0.weight", (mlp * d, d)), ("mlp.0.bias", (mlp * d,)),
            ("mlp.2.weight", (d, mlp * d)), ("mlp.2.bias", (d,)), ("adaLN_modulation.weight", (6 * d, c)),
            ("adaLN_modulation.bias", (6 * d,))]


def _cross_block(d: int, c: int, mlp: int) -> list[tuple[str, tuple]]:
    return [("q_norm1.weight", (d,)), ("kv_norm1.weight", (d,)), ("norm2.weight", (d,)),
            ("attn_q.weight", (d, d)), ("attn_kv.weight", (2 * d, d)), ("attn_out.weight", (d, d)),
            ("mlp.0.weight", (mlp * d, d)), ("mlp.0.bias", (mlp * d,)), ("mlp.2.weight", (d, mlp * d)),
            ("mlp.2.bias", (d,)), ("adaLN_modulation.weight", (6 * d, c)), ("adaLN_modulation.bias", (6 * d,))]


def reference_layout(arch: str, vocab: int, d: int, heads: int, cond: int = 16, mlp: int = 4, n_enc: int = 2,
                     n_dec: int = 2) -> list[tuple[str, tuple]]:
    """(name, shape) of every state-dict entry in registration order; ``vocab`` counts MASK."""
    head = [("vocab_embed.embedding", (vocab, d)), ("sigma_map.mlp.0.weight", (cond, 256)),
            ("sigma_map.mlp.0.bias", (cond,)), ("sigma_map.mlp.2.weight", (cond, cond)),
            ("sigma_map.mlp.2.bias", (cond,))]
    rotary = [("rotary_emb.inv_freq", (d // heads // 2,))]
    out = [("output_layer.norm_final.weight", (d,)), ("output_layer.linear.weight", (vocab, d)),
           ("output_layer.linear.bias", (vocab,)), ("output_layer.adaLN_modulation.weight", (2 * d, cond)),
           ("output_layer.adaLN_modulation.bias", (2 * d,))]
    if arch == "mdlm":  # DIT: vocab_embed, sigma_map, rotary_emb, blocks, output_layer
        blocks = [(f"blocks.{i}.{n}", s) for i in range(n_enc) for n, s in _block(d, cond, mlp)]
        return head + rotary + blocks + out
    # PartitionDIT: vocab_embed, rotary_emb, sigma_map, encoder, decoder (group_swap, layers), output_layer
    encoder = [(f"encoder.blocks.{i}.{n}", s) for i in range(n_enc) for n, s in _block(d, cond, mlp)]
    swap = [(f"decoder.group_swap.{n}", s) for n, s in [
        ("base_embedding", (1, d)), ("pre_query_norm.weight", (d,)), ("pre_query_norm.bias", (d,)),
        ("query_processor.weight", (d, d)), ("query_processor.bias", (d,)),
        ("hidden_to_key_value.weight", (2 * d, d)), ("hidden_to_key_value.bias", (2 * d,)),
        ("output_linear.weight", (d, d)), ("output_linear.bias", (d,))]]
    decoder = [(f"decoder.layers.{j}.{n}", s) for j in range(n_dec) for n, s in _cross_block(d, cond, mlp)]
    return head[:1] + rotary + head[1:] + encoder + swap + decoder + out


def random_reference_state(layout: list[tuple[str, tuple]], seed: int) -> OrderedDict:
    """Perturbed tensors: norm weights 1 + N(0, 0.2), biases N(0, 0.1), matrices N(0, 1/sqrt(fan-in))
    (the adaLN linears too: nothing is zero as at the reference's initialisation)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in layout:
        if name == "rotary_emb.inv_freq":
            half = shape[0]
            state[name] = 1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
        elif "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2 and "embedding" not in name:
            state[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


def save_release(path: Path, raw: OrderedDict, ema: OrderedDict | None) -> Path:
    """A Lightning-style release file: ``state_dict`` (``backbone.``), ``ema`` (the EMA tensors of the
    parameters, buffers excluded, in order), and hyper-parameters pickled as instances of an
    ``omegaconf`` / tokenizer class that exists only while saving."""
    fake = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.dictconfig", "gpt2_tokenization_fast")}
    config_cls = type("DictConfig", (), {"__module__": "omegaconf.dictconfig"})
    tokenizer_cls = type("GPT2TokenizerFast", (), {"__module__": "gpt2_tokenization_fast"})
    fake["omegaconf"].dictconfig = fake["omegaconf.dictconfig"]
    fake["omegaconf.dictconfig"].DictConfig = config_cls
    fake["gpt2_tokenization_fast"].GPT2TokenizerFast = tokenizer_cls
    config, tokenizer = config_cls(), tokenizer_cls()
    config.__dict__.update({"_content": {"model": {"length": 1024}}})
    tokenizer.__dict__.update({"name_or_path": "gpt2"})
    ckpt = {"epoch": 3, "global_step": 1234, "state_dict": OrderedDict((f"backbone.{k}", v) for k, v in raw.items()),
            "hyper_parameters": {"config": config, "tokenizer": tokenizer}, "optimizer_states": []}
    if ema is not None:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 1234,
                       "shadow_params": [v for k, v in ema.items() if k != "rotary_emb.inv_freq"]}
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        torch.save(ckpt, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path


def reference_image_layout(codebook: int, d: int, heads: int, classes: int, n_enc: int = 2, n_dec: int = 2,
                           mlp: int = 4) -> list[tuple[str, tuple]]:
    """The image PGM's ``model_state_dict`` (the image branch's PartitionDIT with class embedding and two
    register tokens): ids are the codes, MASK (``codebook``) and BOS (``codebook + 1``); the adaLN
    linears read the class embedding (width d); ``classes + 1`` rows, the null label last."""
    text = reference_layout("pgm", codebook + 2, d, heads, cond=d, mlp=mlp, n_enc=n_enc, n_dec=n_dec)
    body = [(name, shape) for name, shape in text if not name.startswith("sigma_map.")]
    return (body[:1] + [("cls_embed.embedding_table.weight", (classes + 1, d))] + body[1:]
            + [("reg_tokens.weight", (2, d))])


def save_image_release(path: Path, state: OrderedDict) -> Path:
    """The image trainer's file: its network's state dict and the loop's counters."""
    torch.save({"iter": 4321, "global_epoch": 100, "model_state_dict": state, "optimizer_state_dict": None}, path)
    return path
