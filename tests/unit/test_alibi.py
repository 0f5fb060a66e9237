"""model.pe=alibi: the slopes against the paper's reference code and hand values, the scores against a plain loop
that adds -slope * (query - key), the fused path (SDPA with a float mask) against the explicit path, and lengths
past the trained one."""

from __future__ import annotations

import math

import pytest
import torch

from attention_reference import alibi_slopes_loop
from attnlab.analysis.capture import capture_attention, explicit_attention
from attnlab.model.positional import alibi_bias, alibi_slopes
from attnlab.model.transformer import longer_context
from builders import tiny_model

VOCAB, T = 53, 16


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16])
def test_slopes_are_the_papers(n_heads):
    torch.testing.assert_close(alibi_slopes(n_heads).double(), torch.tensor(alibi_slopes_loop(n_heads),
                                                                            dtype=torch.float64), atol=0, rtol=1e-7)


def test_slopes_by_hand():
    assert alibi_slopes(8).tolist() == [2.0 ** -(h + 1) for h in range(8)]  # 1/2, 1/4, ..., 1/256
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # 6 heads: the 4 slopes of 4 heads, then the 1st and 3rd of 8 heads' (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert alibi_slopes(6).tolist() != sorted(alibi_slopes(6).tolist(), reverse=True)  # not simply geometric


def test_bias_is_minus_slope_times_distance():
    slopes = torch.tensor([0.5, 0.125])
    bias = alibi_bias(slopes, 5)  # (H, T, T)
    assert bias.shape == (2, 5, 5)
    for h in range(2):
        for q in range(5):
            for k in range(q + 1):
                assert bias[h, q, k].item() == -slopes[h].item() * (q - k)


def loop_scores(model, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The layer's scaled scores with ALiBi by plain loops over batch, head, query and key, from the q and k the
    layer projects (alibi puts nothing in the stream and does not rotate q or k): (B, H, T, T), -inf after the
    query."""
    attn = model.attention_layers[layer]
    captured = {}
    handle = attn.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        handle.remove()
    q, k, _ = (t.double() for t in attn.projections(captured["x"]))  # (B, T, D) each
    B, length, _ = q.shape
    H, Dh = attn.n_heads, attn.d_head
    slopes = alibi_slopes_loop(H)
    out = torch.full((B, H, length, length), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for query in range(length):
                for key in range(query + 1):
                    dot = sum(q[b, query, h * Dh + i].item() * k[b, key, h * Dh + i].item() for i in range(Dh))
                    out[b, h, query, key] = dot / math.sqrt(Dh) - slopes[h] * (query - key)
    return out


def model_scores(model, idx: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad(), capture_attention(model, [layer], point="hook_scores") as cache:
        model(idx)
    return cache[layer].double()


@pytest.mark.parametrize("n_heads", [4, 2])
def test_scores_are_the_dot_products_plus_the_linear_bias(n_heads):
    model = tiny_model(VOCAB, pe="alibi", n_heads=n_heads, seq_len=T)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = loop_scores(model, idx, 1)
    got = model_scores(model, idx, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the check can fail: the same layer without its bias is far from the loop
    no_bias = got - alibi_bias(model.attention_layers[1].alibi_slopes.double(), 12)  # the plain dot products
    assert not torch.allclose(no_bias, expected, atol=1e-2)


def test_the_fused_path_is_the_explicit_path_also_past_the_trained_length():
    model = tiny_model(VOCAB, pe="alibi", n_heads=4, seq_len=T)
    idx = torch.randint(0, VOCAB, (3, 3 * T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with pytest.raises(ValueError, match="longer than model.seq_len"):
            model(idx)
        with longer_context(model, 3 * T):
            fused = model(idx)  # (B, 3T, V)
            assert not any(layer.explicit for layer in model.attention_layers)
            with explicit_attention(model):
                explicit = model(idx)
        short = model(idx[:, :T])
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[:, :T], short, atol=1e-5, rtol=1e-5)  # causal: the first T are unchanged
    none = tiny_model(VOCAB, pe="none", n_heads=4, seq_len=T)  # the same weights without the bias
    with torch.no_grad():
        assert not torch.allclose(none(idx[:, :T]), short, atol=1e-3)


def test_the_bias_makes_attention_favour_near_keys_in_an_untrained_model():
    """With near-zero q.k at initialization the softmax is the bias's: a head with slope m puts weight
    proportional to exp(-m d) on the key d back, so the steepest head is the most local."""
    model = tiny_model(VOCAB, pe="alibi", n_heads=4, seq_len=T)
    for layer in model.attention_layers:
        torch.nn.init.zeros_(layer.qkv.weight)
        torch.nn.init.zeros_(layer.qkv.bias)
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture_attention(model, [0]) as cache:
        model(idx)
    pattern = cache[0][0]  # (H, T, T)
    slopes = alibi_slopes(4)
    query = T - 1
    distance = query - torch.arange(T, dtype=torch.float64)
    for h in range(4):
        expected = torch.softmax(-slopes[h].double() * distance, dim=0)
        torch.testing.assert_close(pattern[h, query].double(), expected, atol=1e-6, rtol=1e-6)
    assert pattern[0, query, query] > pattern[3, query, query]  # slope 1/4 is more local than 1/256
