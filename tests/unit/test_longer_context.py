"""Evaluating past the trained length: the extended positional tables against their closed forms, the length
guard opened only inside longer_context, learned positions refused, and the per-position loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.model.scoring import score_windows
from attnlab.data.tokens import eval_starts
from attnlab.model.transformer import longer_context
from builders import tiny_model

VOCAB, T = 50, 16


@pytest.mark.parametrize("pe", ["rope", "rope_model_dim", "complex"])
def test_rope_angles_past_the_table_are_the_closed_form(pe):
    model = tiny_model(VOCAB, pe=pe, seq_len=T, qkv_nonlinear_parts=("v",) if pe == "complex" else ("q", "k", "v"))
    attn = model.attention_layers[0]
    before = attn.rope_cos.clone()
    dim, base = 2 * attn.rope_cos.shape[-1], model.cfg.rope_base
    with longer_context(model, 3 * T):
        cos, sin = attn.rope_cos, attn.rope_sin
        assert cos.shape == (3 * T, dim // 2)
        for t in (0, T - 1, T, 2 * T + 5, 3 * T - 1):
            for i in range(dim // 2):
                angle = t * base ** (-2 * i / dim)
                assert cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[t, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert torch.equal(cos[:T], before)  # the trained positions are untouched
    assert torch.equal(attn.rope_cos, before)  # restored


def test_sinusoidal_table_is_extended_and_the_guard_opens_only_inside():
    model = tiny_model(VOCAB, pe="sinusoidal", seq_len=T)
    idx = torch.randint(0, VOCAB, (2, 2 * T), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="longer than model.seq_len"):
        model(idx)
    with torch.no_grad():
        short = model(idx[:, :T])
        with longer_context(model, 2 * T):
            long = model(idx)  # (2, 2T, V)
            t, d = 2 * T - 1, 2 * 3
            assert model.pos_table[t, d].item() == pytest.approx(math.sin(t / 10000 ** (d / model.cfg.d_model)),
                                                                  abs=1e-6)
    torch.testing.assert_close(long[:, :T], short, atol=1e-5, rtol=1e-5)  # causal: the first T are unchanged
    with pytest.raises(ValueError):
        model(idx)  # closed again


def test_learned_positions_cannot_run_past_the_trained_length():
    model = tiny_model(VOCAB, pe="learned", seq_len=T)
    with pytest.raises(ValueError, match="learned"):
        with longer_context(model, 2 * T):
            pass
    assert model.max_len == T


def test_per_position_losses_average_to_the_loss():
    model = tiny_model(VOCAB, seq_len=T)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=2000).astype(np.uint16)
    starts = eval_starts(len(tokens), 2 * T, 20 * T)
    with longer_context(model, 2 * T):
        score = score_windows(model, tokens, starts, 2 * T, batch_size=3)
    assert len(score.position_loss) == len(score.position_tokens) == 2 * T
    assert set(score.position_tokens) == {len(starts)}
    weighted = sum(l * n for l, n in zip(score.position_loss, score.position_tokens)) / sum(score.position_tokens)
    assert weighted == pytest.approx(score.loss, rel=1e-9)
    assert score.n_tokens == len(starts) * 2 * T


def test_evaluate_leaves_out_the_2x_loss_of_learned_positions_and_says_why():
    from attnlab.analysis.evaluate import score_at_length
    from attnlab.core.params import Params

    lines: list[str] = []
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=2000).astype(np.uint16)
    learned = tiny_model(VOCAB, pe="learned", seq_len=T)
    assert score_at_length(learned, tokens, 2 * T, Params(), lines.append) is None
    assert "learned" in lines[-1] and "no positions past" in lines[-1]
    rope = tiny_model(VOCAB, seq_len=T)
    assert score_at_length(rope, tokens[: 2 * T], 2 * T, Params(), lines.append) is None  # split too short
    assert "only" in lines[-1]
    score = score_at_length(rope, tokens, 2 * T, Params(), lines.append)
    assert score is not None and len(score.position_loss) == 2 * T


def test_the_length_test_scores_eval_length_test_tokens_and_none_at_zero():
    from dataclasses import replace

    from attnlab.analysis.evaluate import score_at_length
    from attnlab.core.params import EvalConfig, Params

    tokens = np.random.default_rng(1).integers(0, VOCAB, size=20 * T + 1).astype(np.uint16)
    rope = tiny_model(VOCAB, seq_len=T)
    lines: list[str] = []
    for budget, windows in ((6 * T, 3), (2 * T, 1), (10**6, 10)):  # whole windows of 2T, at most the split's 10
        params = replace(Params(), eval=EvalConfig(length_test_tokens=budget, max_tokens=4 * T))
        assert score_at_length(rope, tokens, 2 * T, params, lines.append).n_tokens == windows * 2 * T, budget
    off = replace(Params(), eval=EvalConfig(length_test_tokens=0))
    assert score_at_length(rope, tokens, 2 * T, off, lines.append) is None
    assert "eval.length_test_tokens is 0" in lines[-1]
