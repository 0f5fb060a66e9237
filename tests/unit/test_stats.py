"""attnlab.analysis.stats against a plain loop reference, closed forms, and the streaming invariants."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from attnlab.analysis import stats
from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats import (CAUSAL_TOLERANCE, STAT_NAMES, offset_patterns, row_constants, row_stats,
                                    stream_attention_stats)
from attnlab.core.params import ModelConfig
from attnlab.model.transformer import Transformer


def loop_reference(weights: torch.Tensor) -> dict[str, np.ndarray]:
    """The straightforward formula, one row at a time, in float64 Python arithmetic."""
    w = weights.double().numpy()
    out = {name: np.zeros(w.shape[:-1]) for name in STAT_NAMES}
    for index in np.ndindex(*w.shape[:-1]):
        t = index[-1]
        row = w[index][: t + 1]  # keys 0..t
        entropy = 0.0
        for p in row:
            if p > 0:
                entropy -= p * math.log2(p)
        out["entropy_bits"][index] = entropy
        out["support"][index] = 2.0**entropy
        out["normalized_support"][index] = 2.0**entropy / (t + 1)
        out["max_weight"][index] = max(row)
        out["mean_distance"][index] = sum(p * (t - j) for j, p in enumerate(row))
        out["weight_on_first"][index] = row[0]
    return out


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    T = scores.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def tiny_model(seed: int = 0, seq_len: int = 24, vocab: int = 50) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=seq_len)
    return Transformer(cfg, vocab).eval()


def test_row_stats_match_loop_reference():
    torch.manual_seed(0)
    weights = causal_softmax(torch.randn(2, 3, 9, 9) * 3)  # (B, H, T, T), some rows nearly one-hot
    got = row_stats(weights)
    want = loop_reference(weights)
    for name in STAT_NAMES:
        assert got[name].shape == (2, 3, 9)
        assert got[name].dtype == torch.float32
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("block_rows", [1, 4, 7, 54, 1000])
def test_row_stats_match_loop_reference_whatever_the_entropy_blocks(monkeypatch, block_rows):
    """The entropy goes through the rows in blocks of ENTROPY_BLOCK weights: blocks of one row, blocks that do
    not divide the rows (54 rows of 9 keys), one block, and one larger than the rows give the same entropies."""
    monkeypatch.setattr(stats, "ENTROPY_BLOCK", block_rows * 9)
    torch.manual_seed(1)
    weights = causal_softmax(torch.randn(2, 3, 9, 9) * 3)  # (B, H, T, T): 54 rows
    want = loop_reference(weights)["entropy_bits"]
    np.testing.assert_allclose(row_stats(weights)["entropy_bits"].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.row_entropy_bits(weights).numpy(), want, rtol=1e-5, atol=1e-5)


def test_row_stats_match_loop_reference_on_hand_built_rows():
    """Rows with exact zeros inside the prefix, a one-hot row and a skewed row, as plain Python lists."""
    rows = [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.25, 0.75, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],  # one-hot on key 1: zero bits, distance 1
        [0.5, 0.0, 0.25, 0.25, 0.0],  # a zero inside the prefix
        [0.1, 0.2, 0.3, 0.0, 0.4],
    ]
    weights = torch.tensor([rows, rows[::-1]], dtype=torch.float64)  # (2, T, T): second copy is non-causal
    got = row_stats(weights[:1])  # (1, T, T): any leading shape
    for t, row in enumerate(rows):
        prefix = row[: t + 1]
        entropy = -sum(p * math.log2(p) for p in prefix if p > 0)
        want = {
            "entropy_bits": entropy,
            "support": 2.0**entropy,
            "normalized_support": 2.0**entropy / (t + 1),
            "max_weight": max(prefix),
            "mean_distance": sum(p * (t - j) for j, p in enumerate(prefix)),
            "weight_on_first": prefix[0],
        }
        for name in STAT_NAMES:
            assert got[name][0, t].item() == pytest.approx(want[name], rel=1e-6, abs=1e-6), (name, t)
    with pytest.raises(ValueError, match=r"query position 0"):
        row_stats(weights)  # rows[::-1] starts with a row whose weight sits after position 0


def test_row_stats_refuses_weight_after_the_query():
    """A row with weight on a later key is an error naming the row, not a silently clamped statistic."""
    torch.manual_seed(2)
    weights = causal_softmax(torch.randn(2, 3, 6, 6))  # (B, H, T, T)
    row_stats(weights)  # causal: fine
    leaky = weights.clone()
    leaky[1, 2, 3, 0] -= 0.1 * leaky[1, 2, 3, 0]
    leaky[1, 2, 3, 5] += 0.1 * weights[1, 2, 3, 0]  # key 5 > query 3; the row still sums to 1
    with pytest.raises(ValueError, match=r"index \(1, 2, 3\) \(query position 3\).*after position 3"):
        row_stats(leaky)


def test_row_stats_refuses_rows_uniform_over_the_whole_window():
    """Uniform over all T keys: the entropy log2(T) used to be clamped to log2(t+1) without a word."""
    T = 5
    with pytest.raises(ValueError, match=r"query position 0"):
        row_stats(torch.full((1, 1, T, T), 1.0 / T))


def test_row_stats_tolerates_rounding_after_the_query():
    weights = causal_softmax(torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(4)))
    tiny_leak = weights + 1e-8 * torch.ones(6, 6).triu(1)  # (B, H, T, T) far below CAUSAL_TOLERANCE per row
    for name, value in row_stats(tiny_leak).items():
        torch.testing.assert_close(value, row_stats(weights)[name], atol=1e-6, rtol=1e-6)


def test_many_tiny_leaks_pass_one_large_leak_is_named_whatever_the_rest_of_its_matrix():
    """check_causal first sums each matrix's weight after the diagonal: rows that each leak less than the
    tolerance can add up to more than it, and must still pass; one leaking row among many clean ones fails."""
    T = 64
    weights = causal_softmax(torch.randn(2, 1, T, T, generator=torch.Generator().manual_seed(5)))  # (B, H, T, T)
    tiny = weights + 1.5e-8 * torch.ones(T, T).triu(1)  # each row < 1e-6 after t, each matrix ~3e-5 in all
    assert float(torch.triu(tiny, 1).sum((-1, -2)).min()) > CAUSAL_TOLERANCE
    row_stats(tiny)
    leaky = weights.clone()
    leaky[1, 0, 40, 41] = 1e-5  # one row of the second matrix
    with pytest.raises(ValueError, match=r"index \(1, 0, 40\) \(query position 40\)"):
        row_stats(leaky)


def test_row_stats_bounds_and_support_identity():
    torch.manual_seed(1)
    weights = causal_softmax(torch.randn(4, 2, 32, 32) * torch.logspace(-2, 2, 4)[:, None, None, None])
    got = row_stats(weights)
    position = torch.arange(32, dtype=torch.float32)
    entropy = got["entropy_bits"]
    assert torch.all(entropy >= 0)
    assert torch.all(entropy <= torch.log2(position + 1))
    torch.testing.assert_close(got["support"], torch.exp2(entropy))
    assert torch.all(got["support"] >= 1) and torch.all(got["support"] <= position + 1)
    assert torch.all(got["normalized_support"] > 0) and torch.all(got["normalized_support"] <= 1)
    assert torch.all(got["mean_distance"] >= -1e-4) and torch.all(got["mean_distance"] <= position + 1e-4)


def test_uniform_rows_give_log2_n_bits_and_support_n():
    T = 17
    weights = torch.ones(T, T).tril()
    weights = weights / weights.sum(-1, keepdim=True)  # row t uniform over t+1 keys
    got = row_stats(weights[None, None])
    n = torch.arange(1, T + 1, dtype=torch.float32)
    torch.testing.assert_close(got["entropy_bits"][0, 0], torch.log2(n))
    torch.testing.assert_close(got["support"][0, 0], n)
    torch.testing.assert_close(got["normalized_support"][0, 0], torch.ones(T))
    torch.testing.assert_close(got["mean_distance"][0, 0], (n - 1) / 2)  # uniform over distances 0..t


def test_one_hot_rows_give_zero_bits_exactly():
    T = 8
    weights = torch.zeros(T, T)
    weights[:, 0] = 1.0  # every query attends only to key 0: exact zeros and ones
    got = row_stats(weights[None, None])
    assert torch.all(torch.isfinite(torch.stack(list(got.values()))))
    assert torch.equal(got["entropy_bits"][0, 0], torch.zeros(T))
    assert torch.equal(got["support"][0, 0], torch.ones(T))
    assert torch.equal(got["max_weight"][0, 0], torch.ones(T))
    assert torch.equal(got["weight_on_first"][0, 0], torch.ones(T))
    torch.testing.assert_close(got["mean_distance"][0, 0], torch.arange(T, dtype=torch.float32))


def test_nan_weights_are_not_hidden():
    weights = torch.full((1, 1, 3, 3), float("nan"))
    assert torch.isnan(row_stats(weights)["entropy_bits"]).all()


def test_a_negative_weight_gives_a_nan_entropy_not_a_clamped_one():
    weights = torch.tensor([[1.0, 0.0, 0.0], [1.2, -0.2, 0.0], [0.2, 0.3, 0.5]])[None, None]  # (1, 1, T, T)
    entropy = row_stats(weights)["entropy_bits"][0, 0]
    assert torch.isnan(entropy[1]) and not torch.isnan(entropy[0]) and not torch.isnan(entropy[2])


def test_offset_patterns_reindex_against_loop():
    rng = np.random.default_rng(0)
    sums = rng.random((2, 3, 6, 6))
    got = offset_patterns(sums)
    for t in range(6):
        for d in range(6):
            if d <= t:
                np.testing.assert_array_equal(got[..., t, d], sums[..., t, t - d])
            else:
                assert np.isnan(got[..., t, d]).all()


def _run_stream(model, examples, batch_size):
    tables = []
    summary = stream_attention_stats(model, examples, batch_size, tables.append)
    return pa.concat_tables(tables).to_pandas(), summary


@pytest.fixture(scope="module")
def stream_inputs():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    examples = {"train": torch.randint(0, 50, (5, 24), generator=g), "val": torch.randint(0, 50, (3, 24), generator=g)}
    return model, examples


def test_stream_matches_capture_and_row_stats(stream_inputs):
    model, examples = stream_inputs
    df, summary = _run_stream(model, examples, batch_size=2)
    L, H, T = 2, 4, 24
    assert len(df) == (5 + 3) * L * H * T == summary.n_rows
    assert list(df["split"].cat.categories) == ["train", "val"]
    # rows ordered (split, example, layer, head, position)
    val = df[df["split"] == "val"]
    with torch.no_grad(), capture_attention(model) as cache:
        model(examples["val"])
        weights = torch.stack([cache[layer] for layer in range(L)], 1)  # (B, L, H, T, T)
    want = loop_reference(weights)
    for name in STAT_NAMES:
        np.testing.assert_allclose(val[name].to_numpy(), want[name].reshape(-1), rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(val["example"].to_numpy(), np.repeat(np.arange(3), L * H * T))
    np.testing.assert_array_equal(val["position"].to_numpy(), np.tile(np.arange(T), 3 * L * H))
    # mean pattern: rows are distributions over key offsets 0..t
    patterns = summary.mean_patterns  # (L, H, T, T)
    assert patterns.shape == (L, H, T, T)
    np.testing.assert_allclose(np.nansum(patterns, -1), 1.0, rtol=1e-5)
    # metrics are the plain means of the rows
    for split in ("train", "val"):
        part = df[df["split"] == split]
        for name in ("entropy_bits", "support", "normalized_support"):
            assert summary.metrics[split][f"mean_{name}"] == pytest.approx(float(part[name].astype("float64").mean()), rel=1e-6)
    # per-head means, val split only: the plain means of each head's rows, averaging to the split's mean
    heads = summary.metrics["val"]["heads"]
    assert "heads" not in summary.metrics["train"]
    assert list(heads) == [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
    for (layer, head), part in val.groupby(["layer", "head"]):
        for name in ("support", "normalized_support"):
            want = float(part[name].astype("float64").mean())
            assert heads[f"L{layer}H{head}"][f"mean_{name}"] == pytest.approx(want, rel=1e-6), (layer, head, name)
    mean_of_heads = np.mean([h["mean_support"] for h in heads.values()])
    assert mean_of_heads == pytest.approx(summary.metrics["val"]["mean_support"], rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_stream_is_independent_of_batch_size(stream_inputs, batch_size):
    model, examples = stream_inputs
    base, base_summary = _run_stream(model, examples, batch_size=5)
    got, summary = _run_stream(model, examples, batch_size=batch_size)
    assert got[["split", "example", "layer", "head", "position"]].equals(
        base[["split", "example", "layer", "head", "position"]]
    )
    for name in STAT_NAMES:
        np.testing.assert_allclose(got[name].to_numpy(), base[name].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(summary.mean_patterns, base_summary.mean_patterns, rtol=1e-5, atol=1e-7)
    for split in ("train", "val"):
        for key, value in base_summary.metrics[split].items():
            if key != "heads":
                assert summary.metrics[split][key] == pytest.approx(value, rel=1e-6)
    for key, value in base_summary.metrics["val"]["heads"].items():
        assert summary.metrics["val"]["heads"][key] == pytest.approx(value, rel=1e-6)


def test_row_stats_runs_under_autograd_after_inference_mode_made_its_constants():
    """row_constants are cached per T: made first under inference mode (as the stream runs), they must still
    serve a caller that differentiates through row_stats."""
    row_constants.cache_clear()
    scores = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.softmax(scores + torch.full((8, 8), float("-inf")).triu(1), -1)  # (B, H, T, T) causal
    with torch.inference_mode():
        first = row_stats(weights)
    leaf = weights.clone().requires_grad_()
    again = row_stats(leaf)
    again["mean_distance"].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    for name, value in first.items():
        torch.testing.assert_close(again[name].detach(), value, rtol=0, atol=0)
