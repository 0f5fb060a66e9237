"""Positional encodings: the sinusoidal table, RoPE (per head or over the whole model dimension), ALiBi's linear
biases and the original study's complex-valued sketch. A new variant goes here, and into model.pe's choices
(core.params).

Shapes: T sequence, D d_model, Dh head dimension, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# ------------------------------------------------------------------------------------ positional encodings


def sinusoidal_table(seq_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.: PE[t, 2i] = sin(t / base^(2i/dim)), PE[t, 2i+1] = cos(t / base^(2i/dim)). (T, dim)"""
    positions = torch.arange(seq_len, dtype=torch.float64)[:, None]  # (T, 1)
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = positions * freqs  # (T, dim/2)
    table = torch.zeros(seq_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


def rope_angles(seq_len: int, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of t * theta_i, theta_i = base^(-2i/dim), for pairs i < dim/2. Each (T, dim/2)."""
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs  # (T, dim/2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_rotation(seq_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """e^{j t theta_i} as complex64, computed once per model: (T, dim/2)."""
    cos, sin = rope_angles(seq_len, dim, base)
    return torch.complex(cos, sin)


def rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) at position t by the angle t * theta_i: z_i * e^{j t theta_i} with
    z_i = x[2i] + j x[2i+1], so that <rot(q, s), rot(k, t)> depends on s and t only through s - t.

    x: (..., T, dim) or anything whose trailing dims broadcast against turn's (T, dim/2) once the pairs are
    formed; turn: complex, from rope_rotation. Returns x's shape and dtype. fp32 and fp64 multiply as complex
    numbers, in place of any dtype conversion. bf16/fp16 have no complex type of their own: on the CPU they
    go through one fp32 complex product, rounded back once (three operations forward and backward, ~3x
    faster there than six in bf16: docs/performance.md); elsewhere (a GPU, where compile fuses them) they
    rotate in real arithmetic in their own dtype, with no fp32 round trip.
    """
    if x.dtype in (torch.float32, torch.float64):
        z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., dim/2) complex, a view of x
        return torch.view_as_real(z * turn.to(z.dtype)).flatten(-2)
    if x.device.type == "cpu":
        return rotate_pairs(x.float(), turn).to(x.dtype)
    cos, sin = turn.real.to(x.dtype), turn.imag.to(x.dtype)  # (T, dim/2) each
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., dim/2) each
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def rotate_heads(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """RoPE per head on a row of several heads: x (B, T, n * Dh) holds n heads of Dh side by side (e.g. q's
    heads, then k's), and each head's pairs turn by the same angles, turn (>= T, Dh/2) from rope_rotation.

    The turn is laid out once for the whole row, (T, n * Dh/2), so that the product runs along rows of n * Dh/2
    complex numbers instead of broadcasting over heads in steps of Dh/2: the products of rotating each head on
    its own (rotate_pairs on (B, T, n, Dh)), in one pass. Returns x's shape and dtype.
    """
    T, width = x.shape[-2], x.shape[-1]
    n = width // (2 * turn.shape[-1])
    return rotate_pairs(x, turn[:T].repeat(1, n))  # turn (T, n * Dh/2): head h's pairs at [h Dh/2, (h+1) Dh/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_pairs with the rotation given as its cos and sin tables (T, dim/2): x (..., T, dim)."""
    work = torch.promote_types(x.dtype, torch.float32)
    return rotate_pairs(x.to(work), torch.complex(cos.to(work), sin.to(work))).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., "Train Short, Test Long", 2022), float32 (H,).

    n_heads a power of two: slope_h = 2^(-8 (h + 1) / n_heads) for h = 0..n_heads-1, a geometric sequence from
    2^(-8/n_heads) down to 2^-8. Otherwise the paper's interpolation: the n slopes of p, the largest power of
    two below n_heads, then every other slope of 2p (its 1st, 3rd, ...: 2^(-8 (2i + 1) / 2p)) for the remaining
    n_heads - p heads.
    """
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be >= 1, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float64).float()


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ALiBi bias added to head h's scaled scores: -slope_h * (query - key), (H, T, T) in slopes' dtype.

    0 on the diagonal and falling linearly with the distance back; entries above the diagonal (key after the
    query) come out positive and are for the causal mask to remove. Any length: nothing is tabulated.
    """
    position = torch.arange(seq_len, device=slopes.device, dtype=slopes.dtype)  # (T,)
    distance = position[:, None] - position[None, :]  # (T, T) query - key
    return -slopes[:, None, None] * distance  # (H, T, T)


def complex_pe_angles(seq_len: int, d_model: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """model.pe=complex: cos and sin of t * theta_i with theta_i = base^(-2i/D), pairs i < D/2. Each (T, D/2).

    The original study's sketch: token vectors are real, position makes them complex, the Q/K projections stay
    real but multiply as complex matrices, and the softmax takes the real part. In each attention layer:

    - x_t in R^D is the layer's input at position t; z_t in C^(D/2) its pairs, z_t[i] = x_t[2i] + j x_t[2i+1].
    - Position: u_t[i] = z_t[i] * e^(j t theta_i) (apply_rope over all D dims, before the projections).
    - Projections: q_t = W_q u_t, k_t = W_k u_t with real W_q, W_k of shape (D/2, D/2), no bias
      (complex_linear: Re and Im are each multiplied by W). Head h owns the complex rows
      R_h = [h Dh/2, (h+1) Dh/2), stored as Dh interleaved real numbers. V = W_v x_t + b_v stays real.
    - Scores: S_h(s, t) = Re(sum_{r in R_h} q_s[r] conj(k_t[r])) / sqrt(Dh). This is the plain real dot
      product of the interleaved vectors, so the explicit path and SDPA compute it unchanged.

    With M_h = W_q[R_h]^T W_k[R_h] (real, (D/2, D/2)) the score expands to
        sqrt(Dh) S_h(s, t) = sum_{a, b} M_h[a, b] Re(z_s[a] conj(z_t[b]) e^(j (s theta_a - t theta_b))),
    and s theta_a - t theta_b = (s - t) theta_a + t (theta_a - theta_b). The a = b terms depend on position
    only through s - t; an a != b term also depends on the absolute t, since all theta_i differ. So:
    - relative only (shifting the whole input by d positions shifts the scores by d) exactly when every M_h is
      diagonal, e.g. W_q = W_k = I, or both diagonal. A general W mixes pairs of different frequencies, and
      the scores then carry absolute position too: unlike rope, which rotates after the projection, per head.
    - always: turning every pair of every token by one common angle phi leaves all scores unchanged
      (q and k both gain e^(j phi), which the conjugate cancels), because W is complex-linear.
    """
    return rope_angles(seq_len, d_model, base)


def complex_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A real matrix W applied as a complex matmul: q = W z, i.e. Re(q) = W Re(z) and Im(q) = W Im(z).

    x holds n complex numbers as interleaved pairs, z_i = x[2i] + j x[2i+1]; weight is real (m, n); the
    result holds m complex numbers the same way. As a real map this is W (x) I_2: it never mixes the real and
    imaginary parts of a number, only numbers with each other. x: (..., 2n) -> (..., 2m).
    """
    parts = x.unflatten(-1, (-1, 2)).transpose(-1, -2)  # (..., 2, n): row 0 real parts, row 1 imaginary parts
    out = parts @ weight.t()  # (..., 2, m)
    return out.transpose(-1, -2).flatten(-2)  # (..., 2m) interleaved again


class ComplexLinear(nn.Module):
    """Q or K of model.pe=complex: a real (D/2, D/2) weight acting on D/2 complex numbers, no bias.

    A bias would add a constant that the position phases never rotate, so it is left out.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_model // 2, d_model // 2))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return complex_linear(x, self.weight)  # (B, T, D)


