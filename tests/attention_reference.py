"""Plain, loop-based references for the model's tensor pieces, written for reading, not speed.

Everything here works on Python floats in explicit loops over batch, head, position and key_pos, so it
shares no vectorised code with attnlab.model. Use tiny shapes only.
"""

from __future__ import annotations

import math

import torch

from attnlab.model.transformer import CausalSelfAttention


def qkv_weights(layer: CausalSelfAttention) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight (D, D), bias (D,)) of Q, K and V: the row blocks [0, D), [D, 2D), [2D, 3D) of the fused map."""
    D = layer.d_model
    if layer.fused:
        return [(layer.qkv.weight[i * D : (i + 1) * D], layer.qkv.bias[i * D : (i + 1) * D]) for i in range(3)]
    return [(proj.linear.weight, proj.linear.bias) for proj in (layer.q_proj, layer.k_proj, layer.v_proj)]


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[list[list[float]]]:
    """x (B, T, D) through a linear map, by loops: out[b][t][o] = sum_i x[b][t][i] * W[o][i] + bias[o]."""
    xs = x.tolist()
    weight = weight.tolist()
    bias = bias.tolist()
    out = []
    for row_b in xs:
        out_b = []
        for row_t in row_b:
            out_b.append([sum(w_oi * x_i for w_oi, x_i in zip(w_o, row_t)) + b_o for w_o, b_o in zip(weight, bias)])
        out.append(out_b)
    return out  # B x T x D_out


def rotate_pairs(vec: list[float], position: int, base: float) -> list[float]:
    """RoPE of one vector at one position: pair i is rotated by position * base^(-2i/len(vec))."""
    dim = len(vec)
    out = list(vec)
    for i in range(dim // 2):
        angle = position * base ** (-2 * i / dim)
        c, s = math.cos(angle), math.sin(angle)
        a, b = vec[2 * i], vec[2 * i + 1]
        out[2 * i] = a * c - b * s
        out[2 * i + 1] = a * s + b * c
    return out


def alibi_slopes_loop(n_heads: int) -> list[float]:
    """The ALiBi paper's slopes, as its reference code writes them (get_slopes): a geometric sequence starting at
    and stepping by 2^(-2^-(log2(n) - 3)) for a power of two n, else the largest power of two's slopes plus every
    other slope of twice that."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes_loop(2 * closest)[0::2][: n_heads - closest]


def loop_attention(
    layer: CausalSelfAttention, x: torch.Tensor, rope_base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal multi-head self-attention of `layer` on x (B, T, D), from its own weights, by explicit loops.

    Supports linear Q/K/V and pe in none / learned / sinusoidal (nothing inside attention), rope (per head),
    rope_model_dim (whole model dimension, before the head split) and alibi (-slope_h * (query - key) added to
    each scaled score, slopes from alibi_slopes_loop).
    Returns (output (B, T, D), pattern (B, H, T, T)) as float64 tensors.
    """
    B, T, D = x.shape
    H, Dh = layer.n_heads, layer.d_head
    base = rope_base
    q, k, v = (linear_rows(x, weight, bias) for weight, bias in qkv_weights(layer))  # B x T x D each
    if layer.pe == "rope_model_dim":
        q = [[rotate_pairs(q[b][t], t, base) for t in range(T)] for b in range(B)]
        k = [[rotate_pairs(k[b][t], t, base) for t in range(T)] for b in range(B)]

    heads_out = [[[0.0] * D for _ in range(T)] for _ in range(B)]  # B x T x D, heads side by side
    pattern = [[[[0.0] * T for _ in range(T)] for _ in range(H)] for _ in range(B)]  # B x H x T x T
    for b in range(B):
        for h in range(H):
            cols = slice(h * Dh, (h + 1) * Dh)
            q_h = [q[b][t][cols] for t in range(T)]
            k_h = [k[b][t][cols] for t in range(T)]
            v_h = [v[b][t][cols] for t in range(T)]
            if layer.pe == "rope":
                q_h = [rotate_pairs(q_h[t], t, base) for t in range(T)]
                k_h = [rotate_pairs(k_h[t], t, base) for t in range(T)]
            for position in range(T):
                scores = []
                for key_pos in range(position + 1):  # causal: keys at or before the query
                    dot = sum(q_h[position][i] * k_h[key_pos][i] for i in range(Dh))
                    bias = -alibi_slopes_loop(H)[h] * (position - key_pos) if layer.pe == "alibi" else 0.0
                    scores.append(dot / math.sqrt(Dh) + bias)
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                weights = [e / total for e in exps]
                for key_pos, w in enumerate(weights):
                    pattern[b][h][position][key_pos] = w
                for i in range(Dh):
                    heads_out[b][position][h * Dh + i] = sum(
                        weights[key_pos] * v_h[key_pos][i] for key_pos in range(position + 1)
                    )
    out = linear_rows(torch.tensor(heads_out, dtype=torch.float64), layer.out_proj.weight, layer.out_proj.bias)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(pattern, dtype=torch.float64)


def sinusoidal_loop(seq_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[t, 2i] = sin(t / base^(2i/dim)), PE[t, 2i+1] = cos(t / base^(2i/dim)), one entry at a time."""
    table = [[0.0] * dim for _ in range(seq_len)]
    for t in range(seq_len):
        for i in range(dim // 2):
            angle = t / base ** (2 * i / dim)
            table[t][2 * i] = math.sin(angle)
            table[t][2 * i + 1] = math.cos(angle)
    return torch.tensor(table, dtype=torch.float64)
