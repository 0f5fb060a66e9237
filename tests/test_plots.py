"""Earth mover's distance against a loop reference and closed forms; plotting functions on a small table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnlab import plots


def emd_loop(a, b) -> float:
    """Integral of |F_a - F_b| over the merged sample points, CDFs counted one element at a time."""
    points = sorted(list(a) + list(b))
    total = 0.0
    for left, right in zip(points[:-1], points[1:]):
        fa = sum(1 for x in a if x <= left) / len(a)
        fb = sum(1 for x in b if x <= left) / len(b)
        total += abs(fa - fb) * (right - left)
    return total


def test_emd_matches_loop_reference_unequal_sizes():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((5, 5), (7, 3), (20, 13)):
        a, b = rng.exponential(3.0, n_a), rng.normal(2.0, 1.0, n_b)
        assert plots.emd_1d(a, b) == pytest.approx(emd_loop(a, b), rel=1e-12)


def test_emd_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.random(50)
    assert plots.emd_1d(a, a + 2.5) == pytest.approx(2.5)  # a shift moves every unit of mass by 2.5
    assert plots.emd_1d(a, a) == 0.0
    assert plots.emd_1d([0.0], [4.0]) == pytest.approx(4.0)
    # equal sizes: mean distance between sorted samples
    b = rng.random(50) * 3
    assert plots.emd_1d(a, b) == pytest.approx(np.mean(np.abs(np.sort(a) - np.sort(b))))


def test_pairwise_emd_is_symmetric_with_zero_diagonal():
    rng = np.random.default_rng(2)
    samples = [rng.random(30) * k for k in range(1, 5)]
    d = plots.pairwise_emd(samples)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert d[0, 1] == pytest.approx(plots.emd_1d(samples[0], samples[1]))


def small_table(L=2, H=2, T=12, n=3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    split, example, layer, head, position = np.meshgrid(range(2), range(n), range(L), range(H), range(T), indexing="ij")
    position = position.ravel()
    entropy = rng.random(position.size) * np.log2(position + 1)
    support = np.exp2(entropy)
    return pd.DataFrame(
        {
            "split": pd.Categorical.from_codes(split.ravel(), ["train", "val"]),
            "example": example.ravel().astype(np.int16),
            "layer": layer.ravel().astype(np.int8),
            "head": head.ravel().astype(np.int8),
            "position": position.astype(np.int16),
            "entropy_bits": entropy.astype(np.float32),
            "support": support.astype(np.float32),
            "normalized_support": (support / (position + 1)).astype(np.float32),
        }
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda df: plots.weights_support(df, 2),
        plots.support_hist_all,
        plots.support_vs_seq_len,
        lambda df: plots.support_hist_by_head(df, (4, 10)),
        plots.entropy_heatmap,
        plots.head_diversity,
        lambda df: plots.mean_patterns(np.full((2, 2, 12, 12), 1 / 12)),
    ],
)
def test_plot_functions_return_titled_figures_at_fixed_dpi(make):
    import matplotlib.pyplot as plt

    fig = make(small_table())
    try:
        assert fig.dpi == plots.DPI
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        assert any(titles)
        labelled = [ax for ax in fig.axes if ax.get_xlabel()]
        assert labelled, "axes need labels"
    finally:
        plt.close(fig)
