"""The transformer against plain references: loop attention, closed-form PE, complex RoPE, parameter count."""

from __future__ import annotations

import math

import pytest
import torch

from builders import tiny_model
from attention_reference import loop_attention, rotate_pairs, sinusoidal_loop

from attnlab.analysis.capture import capture_attention, capture_points, explicit_attention
from attnlab.core.params import ModelConfig
from attnlab.model.positional import (apply_rope, rope_angles, rope_rotation, rotate_heads, rotate_pairs as rotate_model,
                                      sinusoidal_table)
from attnlab.model.transformer import Transformer, count_parameters, flops_per_token
from attnlab.core.params import PE_VARIANTS

VOCAB = 61
PES = PE_VARIANTS  # every positional encoding the config accepts
NORMS = ("post", "pre")


def make_model(seed: int = 0, **overrides) -> Transformer:
    return tiny_model(VOCAB, seed, **{"n_layers": 2, "seq_len": 32, **overrides})


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)  # (B, T)


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("pe", PES)
def test_logits_have_shape_batch_position_vocab(pe):
    model = make_model(pe=pe)
    for length in (1, 7, 32):
        assert model(tokens(3, length)).shape == (3, length, VOCAB)
    with pytest.raises(ValueError, match="model.seq_len=32"):
        model(tokens(1, 33))


# --------------------------------------------------------------------------------- attention vs the loop


@pytest.mark.parametrize(
    ("pe", "rope_base"),
    [("none", 10000.0), ("rope", 10000.0), ("rope", 50.0), ("rope_model_dim", 10000.0), ("alibi", 10000.0)],
)
@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_attention_layer_matches_loop_reference(pe, rope_base, path):
    model = make_model(pe=pe, rope_base=rope_base, d_model=16, n_heads=2, seq_len=8).double()
    layer = model.blocks[0].attn
    for p in layer.parameters():  # non-zero biases, so the reference checks them too
        torch.nn.init.normal_(p, std=0.3)
    layer.force_explicit = path == "explicit"
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # (B, T, D)
    expected, _ = loop_attention(layer, x, rope_base=rope_base)
    with torch.no_grad():
        got = layer(x)  # (B, T, D)
    assert layer.explicit == (path == "explicit")
    # pe=none is float64 throughout; RoPE's cos/sin tables and ALiBi's slopes are float32, worth ~1e-7 here.
    tol = 1e-10 if pe == "none" else 1e-6
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("norm", NORMS)
def test_explicit_and_fused_paths_of_the_transformer_agree(pe, norm):
    model = make_model(pe=pe, norm=norm)
    idx = tokens(2, 32)
    with torch.no_grad():
        fused = model(idx)
        assert not any(layer.explicit for layer in model.attention_layers)
        with explicit_attention(model):
            assert all(layer.explicit for layer in model.attention_layers)
            explicit = model(idx)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert not torch.equal(explicit, model(tokens(2, 32, seed=9)).detach())  # the comparison can fail


def test_paths_agree_with_nonlinear_qkv_heads():
    model = make_model(qkv_nonlinear_heads=("L0H1", "L1"), qkv_nonlinear_parts=("q", "v"))
    idx = tokens(2, 20)
    with torch.no_grad():
        fused = model(idx)
        with explicit_attention(model):
            explicit = model(idx)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize(("seq_len", "dim", "base"), [(12, 8, 10000.0), (40, 6, 10000.0), (5, 16, 100.0)])
def test_rope_angles_match_closed_form(seq_len, dim, base):
    """cos, sin of t * base^(-2i/dim), one entry at a time in Python floats."""
    cos, sin = rope_angles(seq_len, dim, base)
    assert cos.shape == sin.shape == (seq_len, dim // 2)  # (T, dim/2)
    for t in range(seq_len):
        for i in range(dim // 2):
            angle = t * base ** (-2 * i / dim)
            assert cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6), (t, i)
            assert sin[t, i].item() == pytest.approx(math.sin(angle), abs=1e-6), (t, i)


@pytest.mark.parametrize(("dim", "base"), [(8, 10000.0), (6, 10000.0), (16, 100.0)])
def test_apply_rope_is_complex_multiplication(dim, base):
    T = 40
    x = torch.randn(2, 3, T, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # (B, H, T, Dh)
    cos, sin = rope_angles(T, dim, base)
    got = apply_rope(x, cos.double(), sin.double())

    z = torch.view_as_complex(x.reshape(2, 3, T, dim // 2, 2).contiguous())  # (B, H, T, Dh/2) pairs as a + ib
    theta = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)  # (Dh/2,)
    t = torch.arange(T, dtype=torch.float64)[:, None]  # (T, 1)
    expected = torch.view_as_real(z * torch.exp(1j * t * theta)).flatten(-2)  # (B, H, T, Dh)
    # rope_angles hands out float32 cos/sin: angles up to 39 rad carry ~4e-6 rounding.
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert got.dtype == x.dtype


def test_apply_rope_matches_loop_rotation():
    T, dim = 12, 8
    x = torch.randn(T, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_angles(T, dim)
    got = apply_rope(x, cos.double(), sin.double())
    expected = torch.tensor([rotate_pairs(x[t].tolist(), t, 10000.0) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_the_precomputed_rotation_in_bf16_rotates_in_bf16_and_matches_the_loop():
    """Under bf16 autocast q and k stay bf16 (on the CPU through one fp32 product, rounded back once), the same
    numbers to bf16's precision."""
    T, H, dim = 16, 3, 8
    x = torch.randn(2, T, H, dim, generator=torch.Generator().manual_seed(3)).bfloat16()  # (B, T, H, Dh)
    turn = rope_rotation(T, dim)[:, None]  # (T, 1, Dh/2): the same turn for every head
    got = rotate_model(x, turn)
    assert got.dtype == torch.bfloat16
    expected = torch.tensor(
        [[[rotate_pairs(x[b, t, h].double().tolist(), t, 10000.0) for h in range(H)] for t in range(T)]
         for b in range(2)], dtype=torch.float64)  # (B, T, H, Dh)
    torch.testing.assert_close(got.double(), expected, atol=0.05, rtol=0.02)  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(rotate_model(x.float(), turn), expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotating_a_row_of_heads_at_once_equals_rotating_each_head(dtype):
    """rotate_heads on [q | k] (2H heads side by side, a strided slice as the fused projection gives it) against
    rotate_pairs on each head's (B, T, Dh) slice: the same products (to the last bit or two: a vectorised complex
    multiply rounds its FMA differently from the scalar one)."""
    B, T, H, Dh = 2, 12, 3, 8
    qkv = torch.randn(B, T, 3 * H * Dh, generator=torch.Generator().manual_seed(5)).to(dtype)  # (B, T, 3D)
    turn = rope_rotation(T + 4, Dh)  # (>= T, Dh/2): longer than the input, as after longer_context
    got = rotate_heads(qkv[..., : 2 * H * Dh], turn)  # (B, T, 2D)
    assert got.shape == (B, T, 2 * H * Dh) and got.dtype == dtype
    for head in range(2 * H):
        piece = qkv[..., head * Dh : (head + 1) * Dh]  # (B, T, Dh)
        want = rotate_model(piece, turn[:T])  # (B, T, Dh)
        torch.testing.assert_close(got[..., head * Dh : (head + 1) * Dh], want, atol=1e-6, rtol=1e-6, msg=str(head))
    assert not torch.equal(got, qkv[..., : 2 * H * Dh])  # it does rotate


def test_fused_qkv_is_the_three_projections_stacked():
    model = make_model(pe="rope", n_heads=2)
    attn = model.attention_layers[0]
    assert attn.fused and attn.qkv.weight.shape == (3 * attn.d_model, attn.d_model)
    x = torch.randn(2, 5, attn.d_model, generator=torch.Generator().manual_seed(4))  # (B, T, D)
    with torch.no_grad():
        projected = attn.projections(x)  # q, k, v: (B, T, D) each
        for got, weight, bias in zip(projected, attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3)):
            torch.testing.assert_close(got, x @ weight.t() + bias, atol=1e-6, rtol=0)


def test_rope_dot_product_depends_only_on_offset():
    T, dim = 64, 16
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen, dtype=torch.float64)
    cos, sin = (a.double() for a in rope_angles(T, dim))
    q_rot = apply_rope(q.expand(T, dim), cos, sin)  # (T, Dh): q at every position
    k_rot = apply_rope(k.expand(T, dim), cos, sin)
    scores = q_rot @ k_rot.T  # (T, T)
    for i, j, shift in [(5, 2, 7), (10, 10, 30), (3, 0, 60), (20, 4, 1)]:
        assert scores[i + shift, j + shift].item() == pytest.approx(scores[i, j].item(), abs=1e-5)
    assert abs(scores[9, 2] - scores[9, 5]) > 1e-3  # and it does depend on the offset


def layer0_scores(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), capture_attention(model, layers=[0], point="hook_scores") as cache:
        model(idx)
    return cache[0]  # (B, H, T, T), -inf above the diagonal


@pytest.mark.parametrize("pe", ["rope", "rope_model_dim"])
def test_rope_scores_depend_only_on_relative_position(pe):
    """Constant input: every head's scores are a Toeplitz matrix, scores[i, j] = f(i - j)."""
    model = make_model(pe=pe)
    T = 32
    scores = layer0_scores(model, torch.full((1, T), 7))[0]  # (H, T, T)
    for head in range(scores.shape[0]):
        for offset in range(T):
            diagonal = torch.diagonal(scores[head], offset=-offset)  # scores[i, i - offset]
            torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert scores[0, T - 1, :].std() > 1e-5  # not flat: position does change the scores (the fastest head)


def test_rope_scores_shift_invariant_for_periodic_tokens():
    """Tokens repeating with period p: shifting query and key by p leaves every head's score unchanged."""
    model = make_model(pe="rope")
    period, T = 5, 32
    idx = tokens(2, period).repeat(1, math.ceil(T / period))[:, :T]  # (B, T)
    scores = layer0_scores(model, idx)  # (B, H, T, T)
    for i, j in [(4, 1), (9, 9), (12, 0), (20, 7)]:
        torch.testing.assert_close(scores[:, :, i + period, j + period], scores[:, :, i, j], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores[:, :, i + 2 * period, j + 2 * period], scores[:, :, i, j], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pe", ["learned", "sinusoidal"])
def test_absolute_pe_scores_are_not_relative(pe):
    """Control for the two tests above: with absolute positions added to the input, the property fails."""
    model = make_model(pe=pe)
    if pe == "learned":
        torch.nn.init.normal_(model.pos_emb.weight, std=1.0)
    scores = layer0_scores(model, torch.full((1, 32), 7))[0]  # (H, T, T)
    diagonal = torch.diagonal(scores[0], offset=-1)
    assert (diagonal - diagonal[0]).abs().max() > 1e-3


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_rope_model_dim_differs_from_rope_only_with_several_heads(n_heads):
    per_head = make_model(pe="rope", n_heads=n_heads)
    model_dim = make_model(pe="rope_model_dim", n_heads=n_heads)
    state_a, state_b = per_head.state_dict(), model_dim.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)  # same seed, same weights
    torch.manual_seed(1)
    for p in per_head.parameters():  # larger weights than the init, so attention is far from uniform
        torch.nn.init.normal_(p, std=0.3)
    model_dim.load_state_dict(per_head.state_dict())
    idx = tokens(2, 32)
    with torch.no_grad():
        gap = (per_head(idx) - model_dim(idx)).abs().max().item()
    if n_heads == 1:
        assert gap < 1e-5
    else:
        assert gap > 1e-3


# ---------------------------------------------------------------------------------------- sinusoidal PE


@pytest.mark.parametrize(("seq_len", "dim", "base"), [(16, 8, 10000.0), (50, 10, 10000.0), (7, 32, 100.0)])
def test_sinusoidal_table_matches_closed_form(seq_len, dim, base):
    got = sinusoidal_table(seq_len, dim, base)
    assert got.shape == (seq_len, dim)
    torch.testing.assert_close(got.double(), sinusoidal_loop(seq_len, dim, base), atol=1e-6, rtol=0)


def test_sinusoidal_pe_is_added_to_the_scaled_embedding():
    model = make_model(pe="sinusoidal")
    idx = tokens(2, 20)
    with torch.no_grad(), capture_points(model, ["hook_embed"]) as cache:
        model(idx)
    token_part = model.tok_emb(idx) * math.sqrt(32)  # (B, T, D)
    expected = token_part + sinusoidal_loop(20, 32).float()
    torch.testing.assert_close(cache["hook_embed"], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- pe=none


def permuted_scores_agree(pe: str) -> tuple[bool, int]:
    """Layer-0 scores of a permuted input against the permuted scores, on entries that both causal masks keep."""
    model = make_model(pe=pe)
    T = 24
    idx = tokens(1, T)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(4))
    scores = layer0_scores(model, idx)[0]  # (H, T, T)
    scores_perm = layer0_scores(model, idx[:, perm])[0]  # (H, T, T)
    expected = scores[:, perm][:, :, perm]  # scores_perm[h, i, j] should be scores[h, perm[i], perm[j]]
    both = torch.isfinite(scores_perm) & torch.isfinite(expected)  # (H, T, T)
    agree = torch.allclose(scores_perm[both], expected[both], atol=1e-5, rtol=1e-5)
    return agree, int(both[0].sum())


def test_no_pe_is_permutation_equivariant_before_the_causal_mask():
    agree, n_compared = permuted_scores_agree("none")
    assert agree
    assert n_compared > 100  # a good share of the 24 x 24 pairs is compared
    assert not permuted_scores_agree("rope")[0]  # control: a positional encoding breaks the symmetry


# ------------------------------------------------------------------------------------------------ causal


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_changing_token_t_never_changes_logits_before_t(pe, path):
    model = make_model(pe=pe, norm="pre" if pe == "learned" else "post")
    idx = tokens(2, 24)
    for t in (0, 5, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        with torch.no_grad():
            if path == "explicit":
                with explicit_attention(model):
                    before, after = model(idx), model(changed)
            else:
                before, after = model(idx), model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
        assert (after[:, t] - before[:, t]).abs().max() > 1e-4  # token t itself does matter


# ------------------------------------------------------------------------------------ parameters and seeds


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pe": "learned"},
        {"norm": "pre"},
        {"pe": "learned", "norm": "pre", "d_model": 48, "n_heads": 3, "n_layers": 3, "d_ff": 80},
        {"qkv_nonlinear_heads": ("all",)},
        {"qkv_nonlinear_heads": ("L0H1", "L1H3"), "qkv_nonlinear_parts": ("k",), "qkv_nonlinear_hidden": 24},
        {"qkv_nonlinear_heads": ("L1",), "qkv_nonlinear_parts": ("q", "v"), "norm": "pre", "pe": "sinusoidal"},
        {"pe": "rope_model_dim", "n_layers": 1},
    ],
)
def test_count_parameters_matches_the_module(overrides):
    model = make_model(**overrides)
    assert count_parameters(model.cfg, VOCAB) == sum(p.numel() for p in model.parameters())


def test_default_shape_has_about_eleven_million_parameters():
    cfg = ModelConfig()
    n_params = count_parameters(cfg, 8192)
    assert 10e6 < n_params < 12e6
    assert flops_per_token(cfg, n_params) == 6 * n_params + 12 * 4 * 512 * 448


def test_same_seed_gives_identical_init_and_logits():
    a, b = make_model(seed=5, pe="learned"), make_model(seed=5, pe="learned")
    state_a, state_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    idx = tokens(2, 32)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
    other = make_model(seed=6, pe="learned")
    assert not torch.equal(other.tok_emb.weight, a.tok_emb.weight)

