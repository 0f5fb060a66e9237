"""Reference tests of attnlab.interventions: each intervention against a closed form or a loop, isolation of the
edited heads, hook removal, and the evaluation loop against a per-window loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import tiny_model

from attnlab.analysis.capture import capture_attention, capture_points, explicit_attention
from attnlab.analysis.intervention_sweep import make_batches, metrics_from_table, results_table, sweep, sweep_rows
from attnlab.analysis.interventions import (
    MeanAblate,
    Temperature,
    TopK,
    Uniform,
    intervene,
    intervene_parts,
    mean_head_outputs,
    score_intervened,
    score_intervened_together,
)
from attnlab.analysis.stats import row_entropy_bits

B, T, VOCAB = 3, 24, 61


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB, seq_len=T)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def run(model, idx, edits=None, point="hook_pattern"):
    """Logits and each layer's activation at `point` ((B, H, T, T) or (B, H, T, Dh)), on the explicit path."""
    names = [f"blocks.{layer}.attn.{point}" for layer in range(model.cfg.n_layers)]
    with torch.no_grad(), explicit_attention(model), intervene(model, edits or {}), capture_points(model, names) as c:
        logits = model(idx)  # (B, T, V)
    return logits, [c[name] for name in names]


def all_heads(model, intervention):
    return {(layer, head): intervention for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)}


def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) key <= query


# ---------------------------------------------------------------------------------------------- Uniform


def test_uniform_head_output_is_the_running_mean_of_v(model, idx):
    layer, head = 1, 2
    attn = model.attention_layers[layer]
    H, Dh = model.cfg.n_heads, model.cfg.d_head
    _, base_out = run(model, idx, point="hook_head_out")
    with torch.no_grad(), explicit_attention(model), intervene(model, {(layer, head): Uniform()}):
        with capture_points(model, ["blocks.0.hook_resid_post", f"blocks.{layer}.attn.hook_head_out"]) as cache:
            model(idx)
        x = cache["blocks.0.hook_resid_post"]  # (B, T, D): the residual stream entering layer 1
        if model.blocks[layer].pre_norm:  # pre-norm: attention reads ln1(x); post-norm: x itself
            x = model.blocks[layer].ln1(x)
        v = attn.projections(x)[2].view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
    counts = torch.arange(1, T + 1, dtype=torch.float32)[:, None]  # (T, 1) keys visible at each position
    running_mean = v.cumsum(dim=2) / counts  # (B, H, T, Dh)
    out = cache[f"blocks.{layer}.attn.hook_head_out"]  # (B, H, T, Dh)
    torch.testing.assert_close(out[:, head], running_mean[:, head], atol=1e-6, rtol=1e-5)
    others = [h for h in range(H) if h != head]
    assert torch.equal(out[:, others], base_out[layer][:, others])


def test_uniform_pattern_is_one_over_t_plus_one(model, idx):
    _, patterns = run(model, idx, all_heads(model, Uniform()))
    expected = causal_mask(T).float() / torch.arange(1, T + 1, dtype=torch.float32)[:, None]  # (T, T)
    for pattern in patterns:  # (B, H, T, T)
        torch.testing.assert_close(pattern, expected.expand_as(pattern), atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------- identity settings


@pytest.mark.parametrize("intervention", [Temperature(1.0), TopK(T), TopK(10 * T)], ids=repr)
def test_identity_settings_give_the_unmodified_model(model, idx, intervention):
    base_logits, base_patterns = run(model, idx)
    logits, patterns = run(model, idx, all_heads(model, intervention))
    torch.testing.assert_close(logits, base_logits, atol=1e-6, rtol=0)
    for pattern, base in zip(patterns, base_patterns):
        torch.testing.assert_close(pattern, base, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ Temperature


@pytest.mark.parametrize("tau", [0.25, 0.7, 3.0])
def test_temperature_matches_softmax_of_scores_over_tau_by_hand(model, idx, tau):
    layer, head = 1, 3
    _, base_scores = run(model, idx, point="hook_scores")
    _, patterns = run(model, idx, {(layer, head): Temperature(tau)})
    scores = base_scores[layer][:, head].double()  # (B, T, T), -inf above the diagonal
    # softmax by hand over the allowed keys only
    allowed = causal_mask(T)
    shifted = torch.where(allowed, scores / tau, torch.zeros_like(scores))
    shifted = shifted - shifted.masked_fill(~allowed, -1e300).amax(-1, keepdim=True)
    weights = torch.where(allowed, shifted.exp(), torch.zeros_like(shifted))
    expected = weights / weights.sum(-1, keepdim=True)  # (B, T, T)
    torch.testing.assert_close(patterns[layer][:, head].double(), expected, atol=1e-6, rtol=0)


def test_masked_scores_stay_minus_infinity():
    scores = torch.randn(2, 3, 5, 5).masked_fill(~causal_mask(5), float("-inf"))  # (B, h, T, T)
    for intervention in (Uniform(), Temperature(0.1), Temperature(10.0), TopK(1), TopK(3), TopK(99)):
        edited = intervention.edit_scores(scores)
        assert torch.isneginf(edited[..., ~causal_mask(5)]).all(), intervention
        assert not torch.isnan(edited).any(), intervention


# ------------------------------------------------------------------------------------------------- TopK


def loop_top_k_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: per row, sort the allowed keys by (-score, key), keep the first k scores, -inf elsewhere."""
    out = torch.full_like(scores, float("-inf"))
    for index in np.ndindex(*scores.shape[:-1]):
        row = scores[index].tolist()
        allowed = [j for j, s in enumerate(row) if s != float("-inf")]
        for j in sorted(allowed, key=lambda j: (-row[j], j))[:k]:
            out[index + (j,)] = row[j]
    return out


def loop_top_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: per row, the k allowed keys with the largest scores, lowest key position first among ties."""
    return torch.isfinite(loop_top_k_scores(scores, k))


def loop_argmax(row: list[float]) -> int:
    best = 0
    for j, s in enumerate(row):
        if s > row[best]:  # strictly greater: the lowest position wins a tie
            best = j
    return best


def test_top_k_on_hand_built_scores_with_ties():
    inf = float("-inf")
    scores = torch.tensor(
        [
            [0.0, inf, inf, inf, inf],
            [2.0, 2.0, inf, inf, inf],  # a tie: key 0 wins
            [1.0, 3.0, 3.0, inf, inf],  # a tie for the top: key 1 wins
            [5.0, 1.0, 5.0, 5.0, inf],  # a three-way tie
            [0.5, 0.5, 0.5, 0.5, 0.5],  # all tied
        ]
    )[None, None]  # (1, 1, T, T)
    for k in (1, 2, 3, 4, 5, 7):
        edited = TopK(k).edit_scores(scores)
        keep = loop_top_k_keep(scores, k)
        assert torch.equal(torch.isfinite(edited), keep), k
        assert torch.equal(edited[keep], scores[keep]), k  # kept scores are unchanged
    top1 = torch.isfinite(TopK(1).edit_scores(scores))[0, 0]  # (T, T)
    assert top1.nonzero()[:, 1].tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize("k", range(1, 7))
def test_top_k_below_t_matches_the_loop_reference_scores_and_softmax(k):
    """k < T = 7, so the early return for k >= T is never taken: ties, and rows with fewer than k keys."""
    T7 = 7
    gen = torch.Generator().manual_seed(10 + k)
    scores = torch.randint(-2, 3, (3, 2, T7, T7), generator=gen).float()  # (B, h, T, T) 5 values: many ties
    scores[0, 0, T7 - 1] = 1.0  # a row tied everywhere: the k lowest keys win
    scores = scores.masked_fill(~causal_mask(T7), float("-inf"))  # rows t < k - 1 have fewer than k keys
    edited = TopK(k).edit_scores(scores)  # (B, h, T, T)
    want = loop_top_k_scores(scores, k)
    assert torch.equal(edited, want)  # kept scores unchanged, every other key -inf
    kept = torch.isfinite(want).sum(-1)  # (B, h, T)
    assert torch.equal(kept, torch.clamp(torch.arange(1, T7 + 1), max=k).expand_as(kept))
    assert torch.isfinite(want[0, 0, T7 - 1]).nonzero().flatten().tolist() == list(range(k))
    cut_ties = 0  # rows where the k-th and (k+1)-th largest allowed scores tie: the tie-break decides
    for index in np.ndindex(*scores.shape[:-1]):
        ranked = sorted((s for s in scores[index].tolist() if s != float("-inf")), reverse=True)
        cut_ties += len(ranked) > k and ranked[k - 1] == ranked[k]
    assert cut_ties >= 1
    pattern = torch.softmax(edited, -1)  # (B, h, T, T) what the model's softmax makes of the edit
    torch.testing.assert_close(pattern, torch.softmax(want, -1), atol=1e-7, rtol=0)
    assert torch.equal(pattern > 0, torch.isfinite(want))  # weight exactly on the kept keys


def test_top_1_puts_all_weight_on_the_argmax_key(model, idx):
    _, base_scores = run(model, idx, point="hook_scores")
    _, patterns = run(model, idx, all_heads(model, TopK(1)))
    # layer 0 sees the same input, so its scores are the unedited ones: compare with a loop argmax
    scores, pattern = base_scores[0], patterns[0]  # (B, H, T, T)
    expected = torch.zeros_like(pattern)
    for b, h, t in np.ndindex(B, model.cfg.n_heads, T):
        expected[b, h, t, loop_argmax(scores[b, h, t, : t + 1].tolist())] = 1.0
    assert torch.equal(pattern, expected)
    for pattern in patterns:  # every layer: one-hot rows
        assert torch.equal(pattern.amax(-1), torch.ones_like(pattern.amax(-1)))


def test_top_1_breaks_a_constructed_tie_towards_the_lowest_key():
    model = tiny_model(vocab_size=VOCAB, seq_len=T)
    head, Dh = 1, model.cfg.d_head
    qkv = model.attention_layers[0].qkv  # rows [0, D) are the queries
    with torch.no_grad():  # zero queries for layer 0 head 1: every score of that head is exactly 0, all tied
        qkv.weight[head * Dh : (head + 1) * Dh] = 0
        qkv.bias[head * Dh : (head + 1) * Dh] = 0
    idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    _, scores = run(model, idx, point="hook_scores")
    assert torch.equal(scores[0][:, head].masked_fill(~causal_mask(T), 0), torch.zeros(B, T, T))
    _, patterns = run(model, idx, {(0, head): TopK(1)})
    expected = torch.zeros(B, T, T)
    expected[..., 0] = 1.0  # every query row: all weight on key 0
    assert torch.equal(patterns[0][:, head], expected)


# ------------------------------------------------------------------------------------------ MeanAblate


def test_mean_head_outputs_match_a_loop_over_windows(model):
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, VOCAB, (n, T), generator=gen), torch.zeros(n, T, dtype=torch.long)) for n in (2, 3)]
    means = mean_head_outputs(model, batches)  # (L, H, Dh)
    outs = []
    for inputs, _ in batches:
        for window in inputs:
            _, head_out = run(model, window[None], point="hook_head_out")  # per layer (1, H, T, Dh)
            outs.append(torch.stack([o[0] for o in head_out]))  # (L, H, T, Dh)
    expected = torch.stack(outs).double().mean(dim=(0, 3)).float()  # (windows, L, H, T, Dh) -> (L, H, Dh)
    torch.testing.assert_close(means, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 2)])
def test_mean_ablation_changes_only_that_heads_output(model, idx, layer, head):
    means = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)  # (L, H, Dh)
    _, base = run(model, idx, point="hook_head_out")
    logits, edited = run(model, idx, {(layer, head): MeanAblate(means)}, point="hook_head_out")
    others = [h for h in range(model.cfg.n_heads) if h != head]
    assert torch.equal(edited[layer][:, others], base[layer][:, others])  # bitwise, before out_proj
    assert torch.equal(edited[layer][:, head], means[layer, head].expand(B, T, -1))
    for earlier in range(layer):
        assert torch.equal(edited[earlier], base[earlier])
    base_logits, _ = run(model, idx)
    assert not torch.allclose(logits, base_logits)


# --------------------------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("intervention", [Uniform(), Temperature(0.5), TopK(2)], ids=repr)
@pytest.mark.parametrize("layer, head", [(0, 3), (1, 0)])
def test_an_edit_leaves_other_heads_and_earlier_layers_untouched(model, idx, intervention, layer, head):
    _, base = run(model, idx)
    _, edited = run(model, idx, {(layer, head): intervention})
    others = [h for h in range(model.cfg.n_heads) if h != head]
    assert torch.equal(edited[layer][:, others], base[layer][:, others])
    assert not torch.allclose(edited[layer][:, head], base[layer][:, head])
    for earlier in range(layer):
        assert torch.equal(edited[earlier], base[earlier])


def test_different_interventions_on_heads_of_one_layer_equal_each_alone(model, idx):
    mixed = {(1, 0): Temperature(2.0), (1, 1): TopK(1), (1, 2): Uniform(), (1, 3): TopK(3)}
    _, together = run(model, idx, mixed)
    for (layer, head), intervention in mixed.items():
        _, alone = run(model, idx, {(layer, head): intervention})
        assert torch.equal(together[layer][:, head], alone[layer][:, head])


# ----------------------------------------------------------------------------------- hooks and weights


def test_hooks_are_removed_and_weights_untouched(model, idx):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(idx)
    means = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    edits = {(0, 0): Uniform(), (0, 1): Temperature(0.5), (1, 2): TopK(1), (1, 3): MeanAblate(means)}
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(model, edits):
            assert model.attention_layers[0].hook_scores.active
            assert model.attention_layers[1].hook_head_out.active
            raise RuntimeError("error inside the block")
    with intervene(model, edits), torch.no_grad():
        model(idx)
    hook_points = [m for name, m in model.named_modules() if name.split(".")[-1].startswith("hook_")]
    assert hook_points and not any(m._forward_hooks or m._forward_pre_hooks for m in hook_points)
    assert not any(layer.explicit for layer in model.attention_layers)  # back on the fused path
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_interventions_are_refused(model):
    with pytest.raises(ValueError, match="tau"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="k"):
        TopK(0)
    with pytest.raises(ValueError, match="does not exist"):
        with intervene(model, {(2, 0): Uniform()}):
            pass
    with pytest.raises(ValueError, match="does not exist"):
        with intervene(model, {(0, 4): Uniform()}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with intervene(model, {(0, 0): MeanAblate(torch.zeros(2, 4, 3))}):
            pass


# ---------------------------------------------------------------------------------- the evaluation loop


def test_row_entropy_bits_closed_forms():
    uniform = causal_mask(6).float() / torch.arange(1, 7, dtype=torch.float32)[:, None]  # (T, T)
    torch.testing.assert_close(row_entropy_bits(uniform), torch.log2(torch.arange(1.0, 7.0)))
    assert torch.equal(row_entropy_bits(torch.eye(6)), torch.zeros(6))  # one-hot rows: 0 bits, no NaN from 0 log 0
    negative = torch.eye(6)
    negative[3, :2] = torch.tensor([-0.5, 0.5])  # a row with a weight below 0: its entropy is undefined
    bits = row_entropy_bits(negative)
    assert torch.isnan(bits[3]) and not torch.isnan(bits[[0, 1, 2, 4, 5]]).any()


def test_score_intervened_matches_a_per_window_loop_and_is_batch_independent(model):
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=7 * T + 1).astype(np.uint16)
    starts = np.arange(7) * T
    loss_loop, entropy_loop = [], []
    for start in starts:
        window = torch.from_numpy(tokens[start : start + T + 1].astype(np.int64))
        with torch.no_grad(), explicit_attention(model), capture_attention(model) as patterns:
            logits = model(window[None, :-1])[0]  # (T, V)
        log_probs = logits.double().log_softmax(-1)
        loss_loop += [-log_probs[t, window[t + 1]].item() for t in range(T)]
        for pattern in patterns.values():  # (1, H, T, T)
            for h, t in np.ndindex(model.cfg.n_heads, T):
                p = pattern[0, h, t, : t + 1].double()
                entropy_loop.append(-(p * torch.log2(p)).nansum().item())
    for batch_size in (1, 3, 7):
        result = score_intervened(model, make_batches(tokens, starts, T, batch_size, "cpu"))
        assert result.n_tokens == 7 * T
        assert result.loss == pytest.approx(np.mean(loss_loop), abs=1e-5)
        assert result.ppl == pytest.approx(math.exp(np.mean(loss_loop)), rel=1e-5)
        assert result.mean_entropy_bits == pytest.approx(np.mean(entropy_loop), abs=1e-6)


def test_score_intervened_uniform_entropy_is_the_mean_of_log2_keys(model, idx):
    result = score_intervened(model, [(idx, idx)], all_heads(model, Uniform()))
    assert result.mean_entropy_bits == pytest.approx(np.mean(np.log2(np.arange(1, T + 1))), abs=1e-6)  # float32 weights


def test_sweep_rows_table_and_metrics_layout(model, idx):
    means = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    rows = sweep_rows(model.cfg.n_layers, model.cfg.n_heads, [0.5, 1.0, 0.5], [1, 4], means)
    assert [(r.kind, r.setting) for r in rows][:7] == [
        ("baseline", ""), ("uniform_all", ""), ("uniform_layer", "0"), ("uniform_layer", "1"),
        ("temperature", "0.5"), ("temperature", "1.0"), ("top_k", "1"),
    ]  # fmt: skip
    assert len(rows) == 2 + 2 + 2 + 2 + 8
    results = [score_intervened(model, [(idx, idx)], row.edits) for row in rows]
    table = results_table(rows, results)
    metrics = metrics_from_table(table)
    assert list(metrics) == ["baseline", "uniform_all", "uniform_layer", "temperature", "top_k", "mean_ablate"]
    assert set(metrics["baseline"]) == {"loss", "ppl", "mean_entropy_bits"}
    assert list(metrics["temperature"]) == ["0.5", "1.0"] and list(metrics["top_k"]) == ["1", "4"]
    assert list(metrics["mean_ablate"]) == [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
    ablate = metrics["mean_ablate"]["L1H2"]
    assert set(ablate) == {"loss", "delta", "delta_low", "delta_high"}
    assert ablate["delta"] == pytest.approx(ablate["loss"] - metrics["baseline"]["loss"])
    low, high = ablate["delta_low"], ablate["delta_high"]
    assert low <= high and table.loc[0, "delta_low"] == table.loc[0, "delta_high"] == 0.0  # baseline vs itself
    assert metrics["temperature"]["1.0"]["loss"] == pytest.approx(metrics["baseline"]["loss"], abs=1e-6)
    assert table["layer"].isna().sum() == 2 + 2 + 2  # baseline, uniform_all and the sweeps are all layers


def test_sweep_points_scored_together_equal_each_alone_exactly(model):
    """Stacked in one pass (each part under its own edits) or one set at a time: the same floats, bit for bit,
    whatever the group size, with a short last batch and edits of every kind (a group of partial-head edits too)."""
    tokens = np.random.default_rng(3).integers(0, VOCAB, size=5 * T + 1).astype(np.uint16)
    batches = make_batches(tokens, np.arange(5) * T, T, 2, "cpu")  # batches of 2, 2 and 1 windows
    means = mean_head_outputs(model, batches)
    rows = sweep_rows(model.cfg.n_layers, model.cfg.n_heads, [0.5, 2.0], [1, 3], means)
    alone = [score_intervened(model, batches, row.edits) for row in rows]
    for points_per_pass in (2, 3, len(rows)):
        assert sweep(model, batches, rows, points_per_pass) == alone, points_per_pass
    mixed = [{(0, 1): TopK(2), (1, 0): Temperature(0.5)}, {}, {(1, 3): MeanAblate(means), (0, 0): Uniform()}]
    assert score_intervened_together(model, batches, mixed) == [score_intervened(model, batches, e) for e in mixed]
    assert alone[0] != alone[1]  # and the edits differ from each other


def test_stacked_parts_under_autograd_are_each_part_alone(model, idx):
    """With gradients on, the parts are edited on a copy (no in-place write into a tensor autograd saved)."""
    sets = [all_heads(model, TopK(2)), {}, {(1, 2): Temperature(3.0)}]
    with explicit_attention(model), intervene_parts(model, sets):
        stacked = model(idx.repeat(3, 1))  # (3 B, T, V)
    stacked.sum().backward()
    for r, edits in enumerate(sets):
        with torch.no_grad(), explicit_attention(model), intervene(model, edits):
            torch.testing.assert_close(stacked[r * B : (r + 1) * B].detach(), model(idx), atol=0, rtol=0)
    model.zero_grad()


def test_the_bootstrap_interval_is_the_loop_of_resampled_means_and_brackets_the_mean():
    from attnlab.analysis.intervention_sweep import bootstrap_interval

    values = np.random.default_rng(4).normal(0.1, 0.05, size=40)
    low, high = bootstrap_interval(values, seed=7, resamples=500)
    rng = np.random.default_rng(7)
    picks = rng.integers(0, 40, size=(500, 40))
    means = sorted(sum(values[i] for i in row) / 40 for row in picks)  # one resample at a time
    assert low == pytest.approx(np.quantile(means, 0.025)) and high == pytest.approx(np.quantile(means, 0.975))
    assert low < values.mean() < high
    # about 1.96 standard errors either side for a sample this close to normal
    half = 1.96 * values.std(ddof=1) / np.sqrt(40)
    assert (high - low) / 2 == pytest.approx(half, rel=0.2)
    assert bootstrap_interval(np.full(10, 0.3), seed=0) == pytest.approx((0.3, 0.3))  # no spread, no width


def test_scores_carry_each_windows_mean_loss_in_batch_order(model):
    from attnlab.model.scoring import score_batches, token_losses

    tokens = torch.from_numpy(np.random.default_rng(5).integers(0, VOCAB, size=(5, T + 1)))
    batches = [(tokens[:3, :-1], tokens[:3, 1:]), (tokens[3:, :-1], tokens[3:, 1:])]
    score = score_batches(model, batches)
    with torch.no_grad():
        want = [token_losses(model, x[None], y[None]).double().mean().item()
                for x, y in zip(tokens[:, :-1], tokens[:, 1:])]
    assert score.window_loss == pytest.approx(want, rel=1e-6)
    assert np.mean(score.window_loss) == pytest.approx(score.loss, rel=1e-9)  # equal windows: the mean of means
