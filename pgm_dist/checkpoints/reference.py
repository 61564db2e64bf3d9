"""The authors' released text checkpoints (Hugging Face ``jdeschena/pgm``: ``pgm_8_8.ckpt``,
``pgm_6_6_dim1024.ckpt``, ``mdlm.ckpt`` and their ``*_sdtt_*`` students) as our models.

A release file is a Lightning checkpoint: ``state_dict`` (the backbone's parameters under
``backbone.``, and the rotary buffer ``backbone.rotary_emb.inv_freq``) and ``ema``
(``shadow_params``: the EMA weights in ``backbone.parameters()`` order, which is the state
dict's order without its buffers). Shapes give the architecture (the rotary buffer gives the
head dim); the vocabulary holds GPT-2's 50,257 ids and the MASK id last, as ours.

Every reference parameter is used, none invented; the mapping is exact:

- the fused ``attn_qkv`` splits into ``q_proj`` (rows ``[0:d]``) and ``kv_proj`` (``[d:3d]``);
- the blocks' weight-only LayerNorms fold into the adaLN linear that scales their output:
  ``(xn w)(1 + s) + shift = xn (1 + s') + shift`` with ``s' = w (1 + s) - 1``, linear in the
  conditioning, so ``W_s' = w W_s`` and ``b_s' = w b_s + w - 1``;
- the time embedding is constant (every text checkpoint is trained without time
  conditioning: sigma is 0), so ``sigma_map`` becomes our learned constant
  ``C = mlp.2(silu(mlp.0([1]*128 + [0]*128)))`` (the reference's sinusoid is cos-first);
- the GroupSwap: its query seed, LayerNorm and query weight are permuted from the reference's
  cos-first sinusoid to our sin-first one; its projections keep their biases
  (``ModelConfig.swap_bias``);
- the decoder's key/value LayerNorm weight is ``norm_memory``'s, with a zero bias;
- the MASK row of the PGM's embedding and the MASK column of every output layer are dropped:
  the reference sets that logit to -inf (MDLM: -1e6) before its softmax, and a PGM never embeds
  MASK on its own paths.

The checkpoint pickles the run's omegaconf config and tokenizer objects too: the reader stands a
placeholder in for every class but tensors, their storages and dtypes, and the standard
containers and numbers, so neither library is needed and the file cannot run code.
"""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from pgm_dist.models.config import ModelConfig

ROTARY_BUFFER = "rotary_emb.inv_freq"
RELEASE_LENGTH = 1024  # the sequence length of every released text model
IMAGE_GRID = (32, 32)  # the released image models' code grid: 256 px through LlamaGen's VQ-8
_SAFE_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "str", "bytes",
                  "bytearray", "bool", "slice", "range"}


class _Placeholder:
    """Stands in for a pickled object of a class this reader does not rebuild (omegaconf, transformers)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Placeholder(*args, **kwargs)


_REBUILD = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
            "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_device_tensor_from_numpy",
            "_rebuild_meta_tensor_no_storage", "_rebuild_qtensor"}
_ALLOWED = {("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
            ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar")}


def _rebuilt(module: str, name: str) -> bool:
    """Whether the reader rebuilds ``module.name`` for real: tensors, their storages and dtypes, standard
    containers and numbers, each named exactly. Nothing else is called (a pickle cannot run code through
    this reader). A dotted name is refused: the unpickler would follow it attribute by attribute
    (``_rebuild_tensor.__globals__...``) out of any list."""
    if "." in name:
        return False
    if module == "torch":
        found = getattr(torch, name, None)
        return ((module, name) in _ALLOWED or isinstance(found, torch.dtype)
                or (name.endswith("Storage") and isinstance(found, type)))
    return ((module == "torch._utils" and name in _REBUILD) or (module, name) in _ALLOWED
            or (module == "builtins" and name in _SAFE_BUILTINS))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if _rebuilt(module, name):
            return super().find_class(module, name)
        return type(name, (_Placeholder,), {"__module__": module})


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``."""
    Unpickler = _Unpickler
    __name__ = "pgm_dist_reference_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _Unpickler(file, **kwargs).load()


def is_reference_checkpoint(path: str | Path) -> bool:
    """A released file: a single file (our checkpoints and exports are folders)."""
    return Path(path).is_file()


def read_reference(path: str | Path) -> dict:
    """The release file's dict, tensors on the CPU, any other class a placeholder."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except Exception as err:  # a truncated download or another format: say which file and why
        raise ValueError(f"{path}: not a readable reference checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or not ({"state_dict", "model_state_dict"} & set(ckpt)):
        keys = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a reference checkpoint (no 'state_dict' (text) or 'model_state_dict' "
                         f"(images); it holds {keys})")
    return ckpt


def is_image_release(ckpt: dict) -> bool:
    return "model_state_dict" in ckpt and "state_dict" not in ckpt


def backbone_state(ckpt: dict, weights: str = "ema", source: str = "the checkpoint") -> dict[str, Tensor]:
    """The backbone's tensors by reference name (``backbone.`` and torch.compile's ``_orig_mod.``
    removed): ``raw`` = ``state_dict``; ``ema`` = its ``shadow_params`` named in parameter order."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if is_image_release(ckpt):  # the image trainer saves its network's weights only (no EMA)
        if weights == "ema":
            raise ValueError(f"{source} is an image checkpoint, which holds only its raw weights (no EMA): "
                             "convert with --weights raw")
        return {re.sub(r"^_orig_mod\.", "", key): tensor for key, tensor in ckpt["model_state_dict"].items()}
    state = {}
    for key, tensor in ckpt["state_dict"].items():
        if key.startswith("backbone."):
            state[re.sub(r"^(_orig_mod\.)?", "", key[len("backbone."):])] = tensor
    if not state:
        raise ValueError(f"{source}: its state_dict holds no 'backbone.' parameters")
    if weights == "raw":
        return state
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or "shadow_params" not in ema:
        raise ValueError(f"{source} has no EMA weights ('ema' with 'shadow_params'): convert with --weights raw")
    names = [name for name in state if name != ROTARY_BUFFER]
    shadow = ema["shadow_params"]
    if len(shadow) != len(names):
        raise ValueError(f"{source}: {len(shadow)} EMA tensors for {len(names)} parameters")
    for name, tensor in zip(names, shadow):
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"{source}: EMA tensor for {name} has shape {tuple(tensor.shape)}, the parameter "
                             f"{tuple(state[name].shape)}")
    return {**state, **dict(zip(names, shadow))}


def _count(state: dict, prefix: str) -> int:
    found = {int(m[1]) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    if found != set(range(len(found))):
        raise ValueError(f"blocks {sorted(found)} under {prefix!r} are not numbered 0..n-1")
    return len(found)


def reference_config(state: dict[str, Tensor], seq_len: int = RELEASE_LENGTH,
                     image_grid: tuple[int, int] = IMAGE_GRID) -> ModelConfig:
    """The architecture the tensors' shapes give (head dim from the rotary buffer, else 64 as in
    every released model); MDLM when there are ``blocks.``, PGM with ``encoder.blocks.``, the image
    PGM with ``reg_tokens`` (its code grid is not in the weights: ``image_grid``, the paper's 32 x 32)."""
    try:
        rows, d = state["vocab_embed.embedding"].shape
        cond_dim = (state["cls_embed.embedding_table.weight"].shape[1] if "reg_tokens.weight" in state
                    else state["sigma_map.mlp.2.weight"].shape[0])
    except KeyError as err:
        raise ValueError(f"not a reference PGM or MDLM: no {err.args[0]} tensor") from None
    head_dim = 2 * state[ROTARY_BUFFER].numel() if ROTARY_BUFFER in state else 64
    if d % head_dim:
        raise ValueError(f"width {d} is not a multiple of the head dim {head_dim}")
    common = dict(vocab_size=rows - 1, seq_len=seq_len, d_model=d, n_heads=d // head_dim, cond_dim=cond_dim)
    if "reg_tokens.weight" in state:  # the class-conditional image PGM: ids are codes, MASK, BOS
        if "encoder.blocks.0.attn_qkv.weight" not in state:
            raise ValueError("an image model without encoder.blocks.*: only the image PGMs convert (the MaskGIT "
                             "baseline's network, RMSNorm / QK-norm / SwiGLU / learned positions, is not ours)")
        h, w = image_grid
        codebook = rows - 2
        mlp = state["encoder.blocks.0.mlp.0.weight"].shape[0] // d
        return ModelConfig(
            arch="pgm", vocab_size=codebook + 1, seq_len=1 + h * w, d_model=d, n_heads=d // head_dim,
            n_enc=_count(state, "encoder.blocks."), n_dec=_count(state, "decoder.layers."), mlp_ratio=mlp,
            cond_dim=cond_dim, num_classes=state["cls_embed.embedding_table.weight"].shape[0] - 1, registers=True,
            cond_silu=False, image_grid=[h, w], swap_bias=True, register_order="reference", bos_id=codebook,
            eos_id=codebook)
    if "encoder.blocks.0.attn_qkv.weight" in state:
        n_enc, n_dec = _count(state, "encoder.blocks."), _count(state, "decoder.layers.")
        mlp = state["encoder.blocks.0.mlp.0.weight"].shape[0] // d
        return ModelConfig(arch="pgm", n_enc=n_enc, n_dec=n_dec, mlp_ratio=mlp, swap_bias=True, **common)
    if "blocks.0.attn_qkv.weight" in state:
        mlp = state["blocks.0.mlp.0.weight"].shape[0] // d
        return ModelConfig(arch="mdlm", n_enc=_count(state, "blocks."), n_dec=0, mlp_ratio=mlp, **common)
    raise ValueError("neither a reference PGM (encoder.blocks.*) nor an MDLM (blocks.*)")


def _fold_norms(modulation_w: Tensor, modulation_b: Tensor, norms: dict[int, Tensor], d: int
                ) -> tuple[Tensor, Tensor]:
    """adaLN linear (W [k d, c], b [k d]) with the weight-only LayerNorm ``w`` scaled by chunk ``i``
    folded in, for each ``i: w`` of ``norms`` (see the module docstring)."""
    w, b = modulation_w.double().clone(), modulation_b.double().clone()
    for chunk, norm in norms.items():
        rows = slice(chunk * d, (chunk + 1) * d)
        g = norm.double()
        w[rows] = g[:, None] * w[rows]
        b[rows] = g * b[rows] + g - 1
    return w.to(modulation_w.dtype), b.to(modulation_b.dtype)


def time_constant(state: dict[str, Tensor]) -> Tensor:
    """The conditioning vector of sigma = 0: ``mlp.2(silu(mlp.0(cos 0, sin 0)))`` (cos first)."""
    first = state["sigma_map.mlp.0.weight"].double()
    half = first.shape[1] // 2
    freq = torch.cat([torch.ones(half, dtype=torch.float64), torch.zeros(first.shape[1] - half, dtype=torch.float64)])
    hidden = torch.nn.functional.silu(first @ freq + state["sigma_map.mlp.0.bias"].double())
    out = state["sigma_map.mlp.2.weight"].double() @ hidden + state["sigma_map.mlp.2.bias"].double()
    return out.to(first.dtype)


def _self_block(state, ref: str, ours: str, d: int) -> dict[str, Tensor]:
    qkv = state[f"{ref}.attn_qkv.weight"]
    w, b = _fold_norms(state[f"{ref}.adaLN_modulation.weight"], state[f"{ref}.adaLN_modulation.bias"],
                       {1: state[f"{ref}.norm1.weight"], 4: state[f"{ref}.norm2.weight"]}, d)
    return {f"{ours}.attn.q_proj.weight": qkv[:d], f"{ours}.attn.kv_proj.weight": qkv[d:],
            f"{ours}.attn.out_proj.weight": state[f"{ref}.attn_out.weight"],
            **{f"{ours}.mlp.{i}.{p}": state[f"{ref}.mlp.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")},
            f"{ours}.modulation.1.weight": w, f"{ours}.modulation.1.bias": b}


def _cross_block(state, ref: str, ours: str, d: int) -> dict[str, Tensor]:
    w, b = _fold_norms(state[f"{ref}.adaLN_modulation.weight"], state[f"{ref}.adaLN_modulation.bias"],
                       {1: state[f"{ref}.q_norm1.weight"], 4: state[f"{ref}.norm2.weight"]}, d)
    memory_norm = state[f"{ref}.kv_norm1.weight"]
    return {f"{ours}.attn.q_proj.weight": state[f"{ref}.attn_q.weight"],
            f"{ours}.attn.kv_proj.weight": state[f"{ref}.attn_kv.weight"],
            f"{ours}.attn.out_proj.weight": state[f"{ref}.attn_out.weight"],
            f"{ours}.norm_memory.weight": memory_norm, f"{ours}.norm_memory.bias": torch.zeros_like(memory_norm),
            **{f"{ours}.mlp.{i}.{p}": state[f"{ref}.mlp.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")},
            f"{ours}.modulation.1.weight": w, f"{ours}.modulation.1.bias": b}


def _output(state, keep: Tensor, d: int) -> dict[str, Tensor]:
    w, b = _fold_norms(state["output_layer.adaLN_modulation.weight"], state["output_layer.adaLN_modulation.bias"],
                       {1: state["output_layer.norm_final.weight"]}, d)
    return {"output.modulation.1.weight": w, "output.modulation.1.bias": b,
            "output.proj.weight": state["output_layer.linear.weight"][keep],
            "output.proj.bias": state["output_layer.linear.bias"][keep]}


def convert_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict for the reference tensors ``state``; raises naming any reference tensor left
    unused (a layout this converter does not know)."""
    d, vocab = config.d_model, config.vocab_size
    used = {ROTARY_BUFFER}
    tracked = _Tracking(state, used)
    embedding = tracked["vocab_embed.embedding"]
    if config.image_grid is not None:
        # ids: the codes, MASK (never an input, its logit -1e6 in the reference), BOS last; ours: codes, BOS
        keep = torch.cat([torch.arange(vocab - 1), torch.tensor([vocab])])
        out = {"cond.classes.weight": tracked["cls_embed.embedding_table.weight"],  # null label last in both
               # ours: group 0's register, then group 1's; the reference's rows: group 1's, then group 0's
               "registers.tokens": tracked["reg_tokens.weight"][[1, 0]]}
    else:
        keep = torch.arange(vocab)  # MASK, the last id, dropped
        out = {"cond.constant": time_constant(tracked)}
    if config.arch == "mdlm":
        out["embed.weight"] = embedding
        for i in range(config.n_enc):
            out.update(_self_block(tracked, f"blocks.{i}", f"blocks.{i}", d))
    else:
        out["embed.weight"] = embedding[keep]
        for i in range(config.n_enc):
            out.update(_self_block(tracked, f"encoder.blocks.{i}", f"encoder.{i}", d))
        for j in range(config.n_dec):
            out.update(_cross_block(tracked, f"decoder.layers.{j}", f"decoder.{j}", d))
        # our sinusoid is [sin, cos], the reference's [cos, sin]: index j of ours is P[j] of theirs
        perm = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
        swap = "decoder.group_swap"
        kv_w, kv_b = tracked[f"{swap}.hidden_to_key_value.weight"], tracked[f"{swap}.hidden_to_key_value.bias"]
        out.update({
            "group_swap.query_seed": tracked[f"{swap}.base_embedding"].reshape(d)[perm],
            "group_swap.norm.weight": tracked[f"{swap}.pre_query_norm.weight"][perm],
            "group_swap.norm.bias": tracked[f"{swap}.pre_query_norm.bias"][perm],
            "group_swap.attn.q_proj.weight": tracked[f"{swap}.query_processor.weight"][:, perm],
            "group_swap.attn.q_proj.bias": tracked[f"{swap}.query_processor.bias"],
            "group_swap.attn.kv_proj.weight": kv_w, "group_swap.attn.kv_proj.bias": kv_b,
            "group_swap.attn.out_proj.weight": tracked[f"{swap}.output_linear.weight"],
            "group_swap.attn.out_proj.bias": tracked[f"{swap}.output_linear.bias"],
        })
    out.update(_output(tracked, keep, d))
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"reference tensors this converter does not map: {', '.join(unused[:8])}"
                         + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return {name: tensor.float().contiguous() for name, tensor in out.items()}


class _Tracking(dict):
    """The reference tensors, recording which ones the mapping reads."""

    def __init__(self, state: dict, used: set):
        super().__init__(state)
        self.used = used

    def __getitem__(self, key):
        if key not in self:
            raise ValueError(f"the reference checkpoint has no tensor {key!r}: not a released layout")
        self.used.add(key)
        return super().__getitem__(key)


def check_rotary(state: dict[str, Tensor], config: ModelConfig) -> None:
    """The reference's rotary frequencies are ours (base ``config.rope_base``, full head dim)."""
    if ROTARY_BUFFER not in state:
        return
    ours = config.rope_base ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    if not torch.allclose(state[ROTARY_BUFFER].double(), ours, rtol=1e-5, atol=0):
        raise ValueError("the checkpoint's rotary frequencies are not base "
                         f"{config.rope_base:g} over the full head dim {config.head_dim}")


def load_reference(path: str | Path, weights: str = "auto", seq_len: int = RELEASE_LENGTH,
                   image_grid: tuple[int, int] = IMAGE_GRID) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """(our config, our state dict, what the file says of itself) for a released checkpoint;
    ``weights`` "auto": the EMA of a text file, the raw weights of an image file (all it holds)."""
    ckpt = read_reference(path)
    if weights == "auto":
        weights = "raw" if is_image_release(ckpt) else "ema"
    state = backbone_state(ckpt, weights, str(path))
    config = reference_config(state, seq_len, image_grid)
    check_rotary(state, config)
    ema = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else {}
    info = {"reference": str(path), "weights": weights, "global_step": ckpt.get("global_step", ckpt.get("iter")),
            "ema_decay": ema.get("decay"), "ema_updates": ema.get("num_updates"),
            "parameters": sum(math.prod(t.shape) for k, t in state.items() if k != ROTARY_BUFFER)}
    return config, convert_state(state, config), info
