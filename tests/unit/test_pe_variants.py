"""Positional-encoding variants and non-linear Q/K/V heads.

Every variant: shapes, causality, explicit path == SDPA, parameter count == numel. model.pe=complex against a
loop reference in complex128 and the properties its docstring derives. qkv_nonlinear against a loop MLP.
The general model properties (loop attention, rope vs complex multiplication, sinusoidal closed form, ...)
live in test_model.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from attnlab.analysis.capture import explicit_attention
from attnlab.core.errors import ConfigError
from attnlab.core.params import PE_VARIANTS, ModelConfig, load_params
from attnlab.model.positional import apply_rope, complex_linear
from attnlab.model.transformer import CausalSelfAttention, Transformer, count_parameters

VOCAB = 61
REPO = Path(__file__).resolve().parents[2]


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16, qkv_nonlinear_hidden=8)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, VOCAB).eval()


def scores_of(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The (B, H, T, T) scaled scores of one attention layer for input x (B, T, D)."""
    out = {}
    handle = attn.hook_scores.register_forward_hook(lambda m, i, o: out.setdefault("scores", o.detach()))
    try:
        with torch.no_grad():
            attn(x)
    finally:
        handle.remove()
    return out["scores"]


VARIANT_CONFIGS = [dict(pe=pe) for pe in PE_VARIANTS] + [
    dict(pe="rope", qkv_nonlinear_heads=("L0H1",)),
    dict(pe="rope", qkv_nonlinear_heads=("all",)),
    dict(pe="sinusoidal", qkv_nonlinear_heads=("L1",), qkv_nonlinear_parts=("k", "v")),
    dict(pe="complex", qkv_nonlinear_heads=("all",), qkv_nonlinear_parts=("v",)),
    dict(pe="learned", norm="pre"),
]


@pytest.mark.parametrize("kw", VARIANT_CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_variant_shapes_causality_paths_and_parameter_count(kw):
    cfg = tiny(**kw)
    model = build(cfg)
    idx = torch.randint(0, VOCAB, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (3, cfg.seq_len, VOCAB)
        assert torch.isfinite(logits).all()

        # causality: changing the tokens from position p on leaves the logits before p unchanged
        p = 9
        changed = idx.clone()
        changed[:, p:] = (changed[:, p:] + 7) % VOCAB
        assert torch.allclose(model(changed)[:, :p], logits[:, :p], atol=1e-5)
        assert not torch.allclose(model(changed)[:, p:], logits[:, p:], atol=1e-3)

        # the explicit path (scores -> mask -> softmax) and the fused SDPA kernel agree
        with explicit_attention(model):
            explicit = model(idx)
        assert torch.allclose(explicit, logits, atol=1e-5)

    assert count_parameters(cfg, VOCAB) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ model.pe=complex


def complex_scores_reference(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int, base: float):
    """The docstring's math in complex128 with loops: z = pairs of x, u_t = z_t e^(j t theta), q = W_q u,
    S_h(s, t) = Re(sum_{r in head h} q_s[r] conj(k_t[r])) / sqrt(Dh), -inf above the diagonal. x: (T, D)."""
    T, D = x.shape
    Dh = D // n_heads
    x = x.double()
    z = torch.complex(x[:, 0::2], x[:, 1::2])  # (T, D/2)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    scores = torch.full((n_heads, T, T), float("-inf"), dtype=torch.float64)
    for t in range(T):
        u_t = z[t] * torch.exp(1j * t * theta)
        for s in range(t, T):
            u_s = z[s] * torch.exp(1j * s * theta)
            q_s = w_q.double().to(torch.complex128) @ u_s
            k_t = w_k.double().to(torch.complex128) @ u_t
            for h in range(n_heads):
                rows = slice(h * Dh // 2, (h + 1) * Dh // 2)
                scores[h, s, t] = (q_s[rows] * k_t[rows].conj()).sum().real / math.sqrt(Dh)
    return scores


def test_complex_linear_is_a_real_matrix_times_complex_numbers():
    x = torch.randn(5, 12, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    out = complex_linear(x, w)  # (5, 8)
    z = torch.complex(x[:, 0::2], x[:, 1::2])  # (5, 6)
    expected = z @ w.to(torch.complex128).t()  # (5, 4)
    assert out.shape == (5, 8)
    assert torch.allclose(out[:, 0::2], expected.real) and torch.allclose(out[:, 1::2], expected.imag)


def test_complex_scores_match_loop_reference():
    cfg = tiny(pe="complex", rope_base=100.0)
    attn = build(cfg).blocks[0].attn
    x = torch.randn(1, cfg.seq_len, cfg.d_model, generator=torch.Generator().manual_seed(2))
    got = scores_of(attn, x)[0]  # (H, T, T)
    want = complex_scores_reference(x[0], attn.q_proj.weight.detach(), attn.k_proj.weight.detach(),
                                    cfg.n_heads, cfg.rope_base)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite].double(), want[finite], atol=1e-5)


def shifted_scores(attn: CausalSelfAttention, T: int, D: int, shift: int):
    """Scores for x and for x moved `shift` positions later (random tokens in front): ((H, n, n), (H, n, n))."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, T, D, generator=g)
    moved = torch.cat((torch.randn(1, shift, D, generator=g), x[:, : T - shift]), dim=1)  # (1, T, D)
    n = T - shift
    return scores_of(attn, x)[0, :, :n, :n], scores_of(attn, moved)[0, :, shift:, shift:]


def test_complex_scores_are_relative_when_projections_pair_frequencies_with_themselves():
    cfg = tiny(pe="complex")
    attn = build(cfg).blocks[0].attn
    half = cfg.d_model // 2
    with torch.no_grad():  # diagonal W_q, W_k: every M_h = W_q[R_h]^T W_k[R_h] is diagonal
        attn.q_proj.weight.copy_(torch.diag(torch.linspace(0.5, 2.0, half)))
        attn.k_proj.weight.copy_(torch.diag(torch.linspace(1.5, -1.0, half)))
    original, moved = shifted_scores(attn, cfg.seq_len, cfg.d_model, shift=5)
    assert torch.allclose(original, moved, atol=1e-4)


def test_complex_scores_carry_absolute_position_with_a_general_projection():
    cfg = tiny(pe="complex", rope_base=100.0)
    attn = build(cfg).blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight.normal_(generator=torch.Generator().manual_seed(4))
        attn.k_proj.weight.normal_(generator=torch.Generator().manual_seed(5))
    original, moved = shifted_scores(attn, cfg.seq_len, cfg.d_model, shift=5)
    finite = torch.isfinite(original)
    assert (original[finite] - moved[finite]).abs().max() > 0.1 * original[finite].abs().max()


def test_complex_scores_ignore_a_common_phase_for_any_projection():
    cfg = tiny(pe="complex")
    attn = build(cfg).blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight.normal_(generator=torch.Generator().manual_seed(6))
        attn.k_proj.weight.normal_(generator=torch.Generator().manual_seed(7))
    x = torch.randn(1, cfg.seq_len, cfg.d_model, generator=torch.Generator().manual_seed(8))
    phi = 0.7
    cos = torch.full((cfg.seq_len, cfg.d_model // 2), math.cos(phi))
    sin = torch.full((cfg.seq_len, cfg.d_model // 2), math.sin(phi))
    turned = apply_rope(x, cos, sin)  # every pair of every token times e^(j phi)
    assert torch.allclose(scores_of(attn, x), scores_of(attn, turned), atol=1e-4)


def qkv_of(attn: CausalSelfAttention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (B, T, D) outputs of one attention layer's q_proj, k_proj, v_proj for input x (B, T, D)."""
    out, handles = {}, []
    for part in ("q", "k", "v"):
        module = getattr(attn, f"{part}_proj")
        handles.append(module.register_forward_hook(lambda m, i, o, part=part: out.__setitem__(part, o.detach())))
    try:
        with torch.no_grad():
            attn(x)
    finally:
        for h in handles:
            h.remove()
    return out


def test_complex_value_path_is_real_and_position_free():
    """V of a token is the same at every position; Q and K of the same token are not (they see x_pos)."""
    cfg = tiny(pe="complex")
    attn = build(cfg).blocks[0].attn
    assert isinstance(attn.v_proj.linear, torch.nn.Linear) and attn.v_proj.linear.out_features == cfg.d_model
    T, D = cfg.seq_len, cfg.d_model
    g = torch.Generator().manual_seed(9)

    # one token vector at every position
    token = torch.randn(D, generator=g)
    same = qkv_of(attn, token.expand(1, T, D))
    v_token = same["v"][0, 0]  # (D,)
    torch.testing.assert_close(same["v"][0], v_token.expand(T, D), atol=1e-6, rtol=0)
    torch.testing.assert_close(v_token, attn.v_proj.linear(token).detach(), atol=1e-6, rtol=0)  # W_v x + b_v
    for part in ("q", "k"):
        spread = (same[part][0] - same[part][0, :1]).abs().amax(-1)  # (T,) distance from position 0
        assert spread[0] == 0 and (spread[1:] > 1e-3).all(), part

    # the same sequence moved `shift` positions later, random tokens in front
    shift = 5
    x = torch.randn(1, T, D, generator=g)
    moved = torch.cat((torch.randn(1, shift, D, generator=g), x[:, : T - shift]), dim=1)  # (1, T, D)
    a, b = qkv_of(attn, x), qkv_of(attn, moved)
    torch.testing.assert_close(b["v"][:, shift:], a["v"][:, : T - shift], atol=1e-6, rtol=0)
    for part in ("q", "k"):
        assert (b[part][:, shift:] - a[part][:, : T - shift]).abs().max() > 1e-3, part


@pytest.mark.parametrize(("pe", "dim_of"), [("complex", "d_model"), ("rope", "d_head"), ("rope_model_dim", "d_model")])
def test_rotation_buffers_match_closed_form(pe, dim_of):
    """rope_cos[t, i] = cos(t * base^(-2i/dim)), rope_sin likewise, one entry at a time in Python floats."""
    cfg = tiny(pe=pe, rope_base=500.0)
    attn = build(cfg).blocks[1].attn
    dim = getattr(cfg, dim_of)
    assert attn.rope_cos.shape == attn.rope_sin.shape == (cfg.seq_len, dim // 2)  # (T, dim/2)
    for t in range(cfg.seq_len):
        for i in range(dim // 2):
            angle = t * cfg.rope_base ** (-2 * i / dim)
            assert attn.rope_cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6), (t, i)
            assert attn.rope_sin[t, i].item() == pytest.approx(math.sin(angle), abs=1e-6), (t, i)


# ------------------------------------------------------------------------------------------ qkv_nonlinear


def projections_of(model: Transformer, layer: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (B, T, D) Q, K, V of one layer (before RoPE), from the input the layer receives in model(idx)."""
    attn = model.blocks[layer].attn
    inputs = []
    handle = attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(idx)
            q, k, v = attn.projections(inputs[0])
    finally:
        handle.remove()
    return {"q": q, "k": k, "v": v}


def copy_shared_weights(src: Transformer, dst: Transformer) -> None:
    """Copy src's weights into dst; a linear map that lost the rows of non-linear heads gets the rest."""
    src_state = {}
    for name, tensor in src.state_dict().items():  # a fused qkv map as the q, k, v maps it stacks
        if ".qkv." in name:
            for part, rows in zip("qkv", tensor.chunk(3)):
                src_state[name.replace(".qkv.", f".{part}_proj.linear.")] = rows
        else:
            src_state[name] = tensor
    with torch.no_grad():
        for name, tensor in dst.state_dict().items():
            if name not in src_state:
                continue
            full = src_state[name]
            if tensor.shape != full.shape:  # .linear of a Projection with non-linear heads
                proj = dst.get_submodule(name.rsplit(".", 2)[0])
                rows = torch.cat([torch.arange(h * proj.d_head, (h + 1) * proj.d_head) for h in proj.linear_heads])
                full = full[rows]
            tensor.copy_(full)


def test_qkv_nonlinear_changes_only_the_chosen_heads():
    plain_cfg = tiny(pe="rope")
    mixed_cfg = tiny(pe="rope", qkv_nonlinear_heads=("L0H1", "L1H3"), qkv_nonlinear_parts=("q", "v"))
    plain, mixed = build(plain_cfg, seed=0), build(mixed_cfg, seed=1)
    copy_shared_weights(plain, mixed)
    idx = torch.randint(0, VOCAB, (2, plain_cfg.seq_len), generator=torch.Generator().manual_seed(9))
    Dh = plain_cfg.d_head

    # layer 0 sees the same input in both models: every slice but (q, head 1) and (v, head 1) is bitwise equal
    a, b = projections_of(plain, 0, idx), projections_of(mixed, 0, idx)
    for part in ("q", "k", "v"):
        for head in range(plain_cfg.n_heads):
            sl = slice(head * Dh, (head + 1) * Dh)
            same = torch.equal(a[part][..., sl], b[part][..., sl])
            assert same == (part == "k" or head != 1), (part, head)


def test_qkv_nonlinear_head_is_a_gelu_mlp():
    cfg = tiny(pe="none", qkv_nonlinear_heads=("L0H2",), qkv_nonlinear_parts=("k",))
    model = build(cfg)
    proj = model.blocks[0].attn.k_proj
    with torch.no_grad():
        proj.mlp_in_bias.normal_()
        proj.mlp_out_bias.normal_()
    idx = torch.randint(0, VOCAB, (2, cfg.seq_len), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        x = model.tok_emb(idx) * math.sqrt(cfg.d_model)  # layer 0's input with pe=none
        if model.blocks[0].pre_norm:  # the attention reads ln1(x) in a pre-norm block
            x = model.blocks[0].ln1(x)
        got = projections_of(model, 0, idx)["k"][..., 2 * cfg.d_head : 3 * cfg.d_head]
        w1, b1 = proj.mlp_in_weight[0], proj.mlp_in_bias[0]
        w2, b2 = proj.mlp_out_weight[0], proj.mlp_out_bias[0]
        want = torch.stack([F.gelu(x[:, t] @ w1 + b1) @ w2 + b2 for t in range(cfg.seq_len)], dim=1)
    assert torch.allclose(got, want, atol=1e-5)


def test_qkv_nonlinear_every_head_leaves_no_linear_map():
    cfg = tiny(qkv_nonlinear_heads=("all",))
    model = build(cfg)
    for attn in model.attention_layers:
        assert attn.q_proj.linear is None and attn.v_proj.linear is None
    assert count_parameters(cfg, VOCAB) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg, VOCAB) != count_parameters(tiny(), VOCAB)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "model_overrides, key, fragment",
    [
        ({"qkv_nonlinear_heads": ["L9"]}, "model.qkv_nonlinear_heads", "layer 9 does not exist"),
        ({"qkv_nonlinear_heads": ["L0H7"]}, "model.qkv_nonlinear_heads", "head 7 does not exist"),
        ({"qkv_nonlinear_heads": ["every"]}, "model.qkv_nonlinear_heads", "'every' is not 'all'"),
        ({"qkv_nonlinear_parts": ["q", "x"]}, "model.qkv_nonlinear_parts", "'x' is not one of"),
        ({"qkv_nonlinear_parts": ["q", "q"]}, "model.qkv_nonlinear_parts", "repeats a part"),
        ({"pe": "complex", "qkv_nonlinear_heads": ["all"]}, "model.qkv_nonlinear_parts", "[v]"),
        ({"pe": "xpos"}, "model.pe", "rope, rope_model_dim, sinusoidal, learned, none, complex, alibi"),
    ],
)
def test_bad_variant_params_name_the_key(model_overrides, key, fragment):
    overrides = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, **model_overrides}}
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", overrides=overrides)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_complex_with_nonlinear_values_is_valid():
    params = load_params(REPO / "params.yaml", overrides={
        "model": {"pe": "complex", "qkv_nonlinear_heads": ["L0"], "qkv_nonlinear_parts": ["v"]}})
    assert params.model.pe == "complex"


def test_unknown_pe_through_the_config_cli_is_one_line_exit_2(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["pe"] = "xpos"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "attnlab.config", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: model.pe: 'xpos' is not one of: " + ", ".join(PE_VARIANTS)]
