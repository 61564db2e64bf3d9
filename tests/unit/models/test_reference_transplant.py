"""The PGM against an independent, dense re-statement of its architecture.

``dense_pgm`` below is section 3 of docs/pgm-algorithm.md written out in plain torch,
float64, with explicit boolean masks and explicit rotations: same-group encoder,
GroupSwap from ``LN(w + sinusoid(position))``, cross-only decoder with a LayerNorm on
the memory, adaLN-zero, NeoX rotary, untied output. It reads pgm_dist's weights by
name; any drift of the architecture (a missing norm, a residual in GroupSwap, the
decoder attending the wrong stream, a rotated value, ...) breaks the agreement.
"""
import math

import pytest
import torch

from tests.helpers.models import randomized_model


def layer_norm(x, weight=None, bias=None):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return y if weight is None else y * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rotate(x, positions, base=10000.0):
    """NeoX RoPE: dims ``i`` and ``i + D/2`` form a pair rotated by ``position * base^(-2i/D)``.

    x: [B, H, L, D]; positions: [B or 1, L]."""
    D = x.shape[-1]
    angles = positions[:, None, :, None].double() * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], dim=-1)


def attention(W, name, x, x_pos, kv, kv_pos, allowed, heads):
    """x: [B or 1, Q, d] queries; kv: [B, K, d]; allowed: [B, Q, K] bool -> [B, Q, d]."""
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, L, D]
    d = kv.shape[-1]
    q = rotate(split(x @ W[name + "q_proj.weight"].T), x_pos)
    k = rotate(split(kv @ W[name + "kv_proj.weight"][:d].T), kv_pos)
    v = split(kv @ W[name + "kv_proj.weight"][d:].T)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a query without visible keys reads nothing
    return (probs @ v).transpose(1, 2).flatten(2) @ W[name + "out_proj.weight"].T


def adaln(W, name, c, n):
    return (torch.nn.functional.silu(c) @ W[name + "weight"].T + W[name + "bias"])[:, None].chunk(n, dim=-1)


def block(W, name, x, x_pos, allowed, c, heads, memory=None, memory_pos=None):
    """Self-attention block (memory None) or cross-attention-only block, adaLN-zero."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = adaln(W, name + "modulation.1.", c, 6)
    h = layer_norm(x) * (1 + scale_a) + shift_a
    if memory is None:
        x = x + gate_a * attention(W, name + "attn.", h, x_pos, h, x_pos, allowed, heads)
    else:
        kv = layer_norm(memory, W[name + "norm_memory.weight"], W[name + "norm_memory.bias"])
        x = x + gate_a * attention(W, name + "attn.", h, x_pos, kv, memory_pos, allowed, heads)
    h = layer_norm(x) * (1 + scale_m) + shift_m
    mlp = gelu_tanh(h @ W[name + "mlp.0.weight"].T + W[name + "mlp.0.bias"]) @ W[name + "mlp.2.weight"].T
    return x + gate_m * (mlp + W[name + "mlp.2.bias"])


def dense_pgm(W, config, tokens, token_pos, encoder_allowed, query_pos, cross_allowed):
    """Logits [B, Q, V] of the queries at ``query_pos`` given ``tokens`` at ``token_pos``.

    encoder_allowed: [B, C, C] which token sees which in the encoder; cross_allowed:
    [B, Q, C] which token each query sees (GroupSwap and every decoder block)."""
    heads, d = config.n_heads, config.d_model
    c = W["cond.constant"][None]
    x = W["embed.weight"][tokens]
    for i in range(config.n_enc):
        x = block(W, f"encoder.{i}.", x, token_pos, encoder_allowed, c, heads)
    memory = x  # the final encoder output, no norm: each decoder block normalises it
    angles = query_pos[..., None].double() * torch.exp(-math.log(10000.0) * torch.arange(d // 2) / (d // 2))
    seeded = W["group_swap.query_seed"] + torch.cat([angles.sin(), angles.cos()], dim=-1)
    queries = layer_norm(seeded, W["group_swap.norm.weight"], W["group_swap.norm.bias"])
    x = attention(W, "group_swap.attn.", queries, query_pos, memory, token_pos, cross_allowed, heads)
    for i in range(config.n_dec):
        x = block(W, f"decoder.{i}.", x, query_pos, cross_allowed, c, heads, memory, token_pos)
    shift, scale = adaln(W, "output.modulation.1.", c, 2)
    return (layer_norm(x) * (1 + scale) + shift) @ W["output.proj.weight"].T + W["output.proj.bias"]


@pytest.fixture(scope="module")
def model():
    return randomized_model("pgm-tiny").double()


def _weights(model):
    return {name: p.detach() for name, p in model.state_dict().items()}


def test_training_path_equals_the_dense_restatement(model):
    L, V = model.config.seq_len, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, L), generator=g)
    groups = torch.rand(4, L, generator=g) < torch.tensor([[0.2], [0.5], [0.8], [1.0]])  # last: group 0 empty
    positions = torch.arange(L)[None]
    same = groups[:, :, None] == groups[:, None, :]
    expected = dense_pgm(_weights(model), model.config, tokens, positions, same, positions, ~same)
    with torch.no_grad():
        logits = model(tokens, groups)
    assert expected.abs().amax() > 0.1  # the randomized gates and output make the logits non-trivial
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=0)  # logits are float32 by design


@pytest.mark.parametrize("padded", [False, True])
def test_sampling_path_equals_the_dense_restatement(model, padded):
    L, V = model.config.seq_len, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    B, C, Q = 3, 20, 7
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    clean_pos, query_pos = order[:, :C], order[:, C:C + Q]
    clean_tokens = torch.randint(0, V, (B, C), generator=g)
    lengths = torch.tensor([C, 5, 13]) if padded else torch.full((B,), C)
    visible = (torch.arange(C)[None] < lengths[:, None])[:, None]  # [B, 1, C]: the first lengths[b] clean tokens
    expected = dense_pgm(_weights(model), model.config, clean_tokens, clean_pos, visible.expand(B, C, C),
                         query_pos, visible.expand(B, Q, C))
    with torch.no_grad():
        logits = model.predict(clean_tokens, clean_pos, query_pos, clean_lengths=lengths if padded else None)
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=0)  # logits are float32 by design
