"""Evaluating past the trained length: the extended positional tables against their closed forms, the length
guard opened only inside longer_context, learned positions refused, and the per-position loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------------------------- the paired length test


def loop_paired_loss(model, tokens: np.ndarray, target_starts: np.ndarray, m: int) -> float:
    """The paired view m by hand: for each 1x window start s, the model on the m * T tokens that end at s + T
    (from s - (m - 1) T), the cross-entropy of its last T predictions against tokens s + 1 .. s + T, in float64,
    one window at a time, averaged over every target."""
    total, count = 0.0, 0
    with torch.no_grad(), longer_context(model, m * T):
        for s in target_starts:
            window = torch.from_numpy(tokens[s - (m - 1) * T : s + T].astype(np.int64))[None]  # (1, m T)
            logits = model(window)[0, -T:].double()  # (T, V): the predictions of the last T positions
            targets = torch.from_numpy(tokens[s + 1 : s + T + 1].astype(np.int64))  # (T,)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            count += T
    return total / count


def random_tokens(n: int = 3000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.uint16)


def test_the_1x_view_of_the_paired_test_is_val_loss():
    from attnlab.analysis.evaluate import paired_length_losses

    model, tokens = tiny_model(VOCAB, seq_len=T), random_tokens()
    starts = eval_starts(len(tokens), T)
    val = score_windows(model, tokens, starts, T, batch_size=4)
    paired = paired_length_losses(model, tokens, starts, (1,), batch_size=4, log=lambda line: None)
    assert paired.multiples == (1,) and paired.loss[1] == val.loss and paired.n_targets == val.n_tokens
    # with a 4x view the targets are the windows with 3 T tokens before them: the 1x loss is theirs, not val_loss
    paired = paired_length_losses(model, tokens, starts, (1, 4), batch_size=4, log=lambda line: None)
    subset = score_windows(model, tokens, starts[starts >= 3 * T], T, batch_size=4)
    assert paired.loss[1] == pytest.approx(subset.loss, rel=1e-12) and paired.n_targets == subset.n_tokens
    assert paired.loss[1] != pytest.approx(val.loss, rel=1e-9)


@pytest.mark.parametrize("pe", ["rope", "alibi", "sinusoidal"])
def test_every_view_scores_the_same_targets_with_longer_context(pe):
    from attnlab.analysis.evaluate import paired_curves, paired_length_losses

    model, tokens = tiny_model(VOCAB, pe=pe, seq_len=T), random_tokens()
    starts = eval_starts(len(tokens), T, 40 * T)
    paired = paired_length_losses(model, tokens, starts, (1, 2, 4), batch_size=5, log=lambda line: None)
    targets = starts[starts >= 3 * T]
    assert paired.multiples == (1, 2, 4) and paired.n_targets == len(targets) * T
    for m in (1, 2, 4):
        assert paired.loss[m] == pytest.approx(loop_paired_loss(model, tokens, targets, m), abs=1e-5)
    # the check can fail: the unpaired test (windows of 2T at multiples of 2T) scores other targets
    with longer_context(model, 2 * T):
        unpaired = score_windows(model, tokens, eval_starts(len(tokens), 2 * T, 40 * T), 2 * T, batch_size=5)
    assert abs(paired.loss[2] - unpaired.loss) > 1e-4
    curves = paired_curves(paired, T)
    assert curves["context_length"] == [T, 2 * T, 4 * T] and curves["paired_tokens"] == paired.n_targets
    assert len(curves["loss_4x"]) == len(curves["tokens_4x"]) == 4 * T and "loss_1x" not in curves
    assert set(curves["tokens_2x"]) == {len(targets)}


def test_learned_positions_get_the_1x_view_only_and_a_short_split_drops_what_does_not_fit():
    from attnlab.analysis.evaluate import paired_length_losses, paired_metrics

    lines: list[str] = []
    tokens = random_tokens()
    learned = tiny_model(VOCAB, pe="learned", seq_len=T)
    starts = eval_starts(len(tokens), T)
    paired = paired_length_losses(learned, tokens, starts, (1, 2, 4), batch_size=4, log=lines.append)
    assert paired.multiples == (1,) and paired.n_targets == len(starts) * T
    assert all("learned" in line and "no positions past" in line for line in lines) and len(lines) == 2
    assert set(paired_metrics(paired)) == {"val_loss_at_1x_seq_len", "paired_tokens_scored"}
    lines.clear()
    short = tokens[: 3 * T + 1]  # three windows: the third has 2 T tokens before it, none has 3 T
    paired = paired_length_losses(tiny_model(VOCAB, seq_len=T), short, eval_starts(len(short), T), (1, 2, 4), 4,
                                  lines.append)
    assert paired.multiples == (1, 2) and paired.n_targets == 2 * T  # the windows at T and 2 T
    assert len(lines) == 1 and f"no evaluate window with {3 * T} tokens before it" in lines[0]


def test_the_length_test_scores_at_most_eval_length_test_tokens_of_targets():
    from attnlab.analysis.evaluate import paired_length_losses

    rope = tiny_model(VOCAB, seq_len=T)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=20 * T + 1).astype(np.uint16)
    starts = eval_starts(len(tokens), T)  # 20 windows, 17 of them with 3 T tokens before
    for budget, windows in ((6 * T, 6), (T, 1), (0, 17), (10**6, 17)):
        paired = paired_length_losses(rope, tokens, starts, (1, 2, 4), 4, max_targets=budget, log=print)
        assert paired.n_targets == windows * T, budget
        assert paired.scores[4].n_tokens == windows * 4 * T  # each target window scored with 4 T tokens
