"""The attention figures: each function takes the statistics (a DataFrame of stats.parquet rows, the mean
patterns array, or the dynamics.parquet rows of attention across training) and returns a matplotlib Figure;
stages/figure.py saves it. Nothing here reads files.

Conventions: seaborn "whitegrid" style, DPI (100), one colour per split (SPLIT_COLORS), units in axis labels
(bits, tokens), titles that say what is shown. Output is deterministic for the same input.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attnlab.report.style import FIGURE_DPI as DPI  # noqa: E402

SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e"}  # the same colour for a split in every figure
STYLE = "whitegrid"
NORMALIZED_SUPPORT_LABEL = "normalized support = support / (position + 1)"
NORMALIZED_BINS = np.linspace(0.0, 1.0, 51)  # (51,) edges: 50 bins of width 0.02 over (0, 1]


def shape_of(df: pd.DataFrame) -> tuple[int, int, int]:
    """(n_layers, n_heads, seq_len) of a stats table."""
    return int(df["layer"].max()) + 1, int(df["head"].max()) + 1, int(df["position"].max()) + 1


def _grid(n_layers: int, n_heads: int, cell: tuple[float, float] = (3.0, 2.4), **kwargs):
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell[0] * n_heads + 1.5, cell[1] * n_layers + 1.0), dpi=DPI, squeeze=False, **kwargs
    )
    return fig, axes


def _splits(df: pd.DataFrame) -> list[str]:
    present = set(df["split"].astype(str).unique())
    return [s for s in SPLIT_COLORS if s in present]


def rows_in_positions(df: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """The rows whose query position is in [start, stop): position == start is kept, position == stop is not."""
    return df[(df["position"] >= start) & (df["position"] < stop)]


def normalized_values(values: pd.Series) -> np.ndarray:
    """normalized_support as float64, capped at 1: rounding can step a hair above 1 and np.histogram would
    silently drop those rows (the last bin, [0.98, 1], is closed on the right)."""
    return np.minimum(values.to_numpy(dtype=np.float64), 1.0)


def _split_hists(ax, df: pd.DataFrame, column: str, bins: np.ndarray, mean_fmt: str) -> None:
    """Train and val histograms of `column` overlaid on `ax` (density), each with a dashed line at its mean."""
    for split in _splits(df):
        values = df.loc[df["split"] == split, column]
        values = normalized_values(values) if column == "normalized_support" else values.to_numpy()
        color = SPLIT_COLORS[split]
        ax.hist(values, bins=bins, density=True, alpha=0.5, color=color, label=split)
        ax.axvline(values.mean(), color=color, ls="--", lw=1.5, label=f"{split} mean {values.mean():{mean_fmt}}")


# ------------------------------------------------------------------------------------------------ figures


def _finish(fig: Figure, axes, title: str) -> None:
    """A legend on each panel, the figure's title, and a tight layout."""
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()


def weights_support(df: pd.DataFrame, n_examples: int, split: str = "train") -> Figure:
    """attn_weights_support.png: support of one batch, an example x position heatmap per layer/head."""
    L, H, T = shape_of(df)
    part = df[(df["split"] == split) & (df["example"] < n_examples)]
    n = int(part["example"].max()) + 1
    support = np.full((L, H, n, T), np.nan, dtype=np.float32)  # (L, H, examples, T)
    support[part["layer"], part["head"], part["example"], part["position"]] = part["support"]
    with sns.axes_style("white"):
        fig, axes = _grid(L, H, sharex=True, sharey=True)
        for layer in range(L):
            for head in range(H):
                ax = axes[layer, head]
                image = ax.imshow(
                    support[layer, head], aspect="auto", cmap="viridis", vmin=1, vmax=T, interpolation="nearest"
                )
                ax.set_title(f"layer {layer} head {head}", fontsize=9)
                if layer == L - 1:
                    ax.set_xlabel("query position (tokens)")
                if head == 0:
                    ax.set_ylabel("example")
        fig.colorbar(image, ax=axes, shrink=0.6, label="support (tokens)")
        fig.suptitle(f"Attention support for one batch ({n} {split} examples): bright = attends to many tokens")
    return fig


def support_hist_all(df: pd.DataFrame) -> Figure:
    """attn_support_hist_all.png: normalized support (main, left) and raw support (right) over all heads and
    positions, train vs val overlaid. Normalizing by the position + 1 visible keys makes positions comparable."""
    _, _, T = shape_of(df)
    bins = np.linspace(1, T, min(T, 60) + 1)
    with sns.axes_style(STYLE):
        fig, (ax_n, ax_s) = plt.subplots(1, 2, figsize=(14, 5), dpi=DPI)
        _split_hists(ax_n, df, "normalized_support", NORMALIZED_BINS, ".2f")
        ax_n.set_xlim(0.0, 1.0)
        ax_n.set(
            xlabel=f"{NORMALIZED_SUPPORT_LABEL} (1 = uniform over all visible tokens)",
            ylabel="density",
            title=f"Main: {NORMALIZED_SUPPORT_LABEL}",
        )
        _split_hists(ax_s, df, "support", bins, ".1f")
        ax_s.set(
            xlabel=f"support = 2^entropy (tokens; at most position + 1 <= {T})",
            ylabel="density (share of rows per token)",
            title="Raw support (tokens), for reference",
        )
        _finish(fig, (ax_n, ax_s), "Support over all layers, heads and query positions: mass near 0 (left) = sharp "
                "attention")
    return fig


def support_vs_seq_len(df: pd.DataFrame) -> Figure:
    """attn_support_vs_seq_len.png: mean +- std of support and normalized support against query position."""
    _, _, T = shape_of(df)
    with sns.axes_style(STYLE):
        fig, (ax_s, ax_n) = plt.subplots(1, 2, figsize=(13, 5), dpi=DPI)
        positions = np.arange(T)
        ax_s.plot(positions, positions + 1, color="black", ls=":", label="maximum (position + 1)")
        for split in _splits(df):
            part = df[df["split"] == split]
            for ax, column in ((ax_s, "support"), (ax_n, "normalized_support")):
                grouped = part.groupby("position")[column].agg(["mean", "std"]).reindex(positions)
                color = SPLIT_COLORS[split]
                ax.plot(positions, grouped["mean"], color=color, label=f"{split} mean")
                ax.fill_between(
                    positions, grouped["mean"] - grouped["std"], grouped["mean"] + grouped["std"], color=color, alpha=0.2
                )
        ax_n.axhline(1.0, color="black", ls=":", label="maximum (uniform)")
        ax_s.set(xlabel="query position (tokens)", ylabel="support (tokens)", title="Support (mean +- std)")
        ax_n.set(
            xlabel="query position (tokens)",
            ylabel="normalized support (support / (position + 1))",
            title="Normalized support (mean +- std)",
        )
        _finish(fig, (ax_s, ax_n), "How many tokens attention spreads over, by query position (all layers and heads)")
    return fig


def support_hist_by_head(df: pd.DataFrame, seq_len_filter: tuple[int, int]) -> Figure:
    """attn_support_hist_by_block_head_w_seq_len_filter.png: per-head histograms of normalized support,
    support / (position + 1), over the query positions in [start, stop) (rows_in_positions)."""
    L, H, _ = shape_of(df)
    start, stop = seq_len_filter
    part = rows_in_positions(df, start, stop)
    with sns.axes_style(STYLE):
        fig, axes = _grid(L, H, sharex=True, sharey=True)  # one density scale, as the study drew it
        groups = part.groupby(["layer", "head", "split"], observed=True)["normalized_support"]
        for (layer, head, split), values in groups:
            ax = axes[int(layer), int(head)]
            ax.hist(
                normalized_values(values), bins=NORMALIZED_BINS, density=True, alpha=0.5,
                color=SPLIT_COLORS[str(split)], label=str(split),
            )
        for layer in range(L):
            for head in range(H):
                ax = axes[layer, head]
                ax.set_xlim(0.0, 1.0)
                ax.set_title(f"layer {layer} head {head}", fontsize=9)
                if layer == L - 1:
                    ax.set_xlabel(NORMALIZED_SUPPORT_LABEL, fontsize=8)
                if head == 0:
                    ax.set_ylabel("density")
        axes[0, H - 1].legend(fontsize=8)
        fig.suptitle(
            f"Per head: {NORMALIZED_SUPPORT_LABEL}, query positions {start} to {stop - 1}\n"
            "narrow heads peak near 0, uniform ones at 1"
        )
        fig.tight_layout()
    return fig


def entropy_heatmap(df: pd.DataFrame) -> Figure:
    """attn_entropy_heatmap.png: layer x head mean entropy (bits) and mean normalized support."""
    L, H, T = shape_of(df)
    means = df.groupby(["layer", "head"])[["entropy_bits", "normalized_support"]].mean()
    with sns.axes_style("white"):
        fig, (ax_e, ax_n) = plt.subplots(1, 2, figsize=(6 + 1.6 * H, 1.2 * L + 2), dpi=DPI)
        for ax, column, label, vmax in (
            (ax_e, "entropy_bits", "mean entropy (bits)", float(np.log2(T))),
            (ax_n, "normalized_support", "mean normalized support", 1.0),
        ):
            table = means[column].unstack("head").reindex(index=range(L), columns=range(H))
            sns.heatmap(
                table, ax=ax, annot=True, fmt=".2f", cmap="magma", vmin=0, vmax=vmax, cbar_kws={"label": label}
            )
            ax.set(xlabel="head", ylabel="layer", title=label)
        fig.suptitle(f"Per head, train + val (entropy at most log2({T}) = {np.log2(T):.1f} bits): dark = focused")
        fig.tight_layout()
    return fig


def offset_distributions(patterns: np.ndarray) -> np.ndarray:
    """Each head's attention as one distribution over key offsets (tokens back): the mean of its query rows, each
    row a distribution over offsets 0..position (NaN past it counts 0). (L, H, T, T offset) -> (L, H, T)."""
    return np.nan_to_num(patterns.astype(np.float64), nan=0.0).mean(axis=-2)  # (L, H, T), each sums to 1


def pairwise_offset_emd(distributions: np.ndarray) -> np.ndarray:
    """Earth mover's (Wasserstein-1) distance in tokens between every pair of distributions over the key offsets
    0..T-1, (n, T) -> (n, n): on a grid of unit steps it is the sum over offsets of |F_a - F_b|, F the CDF."""
    cdf = np.cumsum(distributions, axis=-1)  # (n, T)
    return np.abs(cdf[:, None, :] - cdf[None, :, :]).sum(-1)  # (n, n)


def head_diversity(patterns: np.ndarray) -> Figure:
    """attn_head_diversity.png: the study's measure, the earth mover's distance between heads' attention
    distributions over key offsets (offset_distributions of the mean patterns, train and val pooled)."""
    L, H, T, _ = patterns.shape
    labels = [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
    distance = pairwise_offset_emd(offset_distributions(patterns).reshape(L * H, T))  # (L H, L H)
    with sns.axes_style("white"):
        size = 3 + 0.5 * len(labels)
        fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=DPI)
        sns.heatmap(
            pd.DataFrame(distance, index=labels, columns=labels),
            ax=ax,
            cmap="viridis",
            square=True,
            annot=len(labels) <= 16,
            fmt=".1f",
            annot_kws={"fontsize": 7},
            cbar_kws={"label": "earth mover's distance (tokens of key offset)"},
        )
        ax.set(xlabel="head (L = layer, H = head)", ylabel="head (L = layer, H = head)")
        ax.set_title("How differently heads spread attention: distance between their distributions over key "
                     f"offsets\n(mean over query positions 0 to {T - 1}, train and val examples pooled)")
        fig.tight_layout()
    return fig


def mean_patterns(patterns: np.ndarray) -> Figure:
    """attn_mean_patterns.png: each head's mean weight by query position x key offset (position - key_pos)."""
    L, H, T, _ = patterns.shape
    floor = 1e-4
    with sns.axes_style("white"):
        fig, axes = _grid(L, H, sharex=True, sharey=True)
        for layer in range(L):
            for head in range(H):
                ax = axes[layer, head]
                image = ax.imshow(
                    np.clip(patterns[layer, head], floor, 1.0),
                    origin="lower",
                    aspect="auto",
                    cmap="viridis",
                    norm=LogNorm(vmin=floor, vmax=1.0),
                    interpolation="nearest",
                )
                ax.set_title(f"layer {layer} head {head}", fontsize=9)
                if layer == L - 1:
                    ax.set_xlabel("key offset (tokens back)")
                if head == 0:
                    ax.set_ylabel("query position")
        fig.colorbar(image, ax=axes, shrink=0.6, label="mean attention weight (log scale)")
        fig.suptitle(
            "Mean attention pattern over the train and val examples pooled: bright columns at small offsets = "
            "local / previous-token head, bright diagonal = attends to the first token"
        )
    return fig


def support_over_training(dynamics: pd.DataFrame) -> Figure:
    """attn_support_over_training.png: each head's mean normalized support on the val examples at every weight
    snapshot, against tokens seen; one panel per layer, one line per head (dynamics.parquet rows)."""
    L, H = int(dynamics["layer"].max()) + 1, int(dynamics["head"].max()) + 1
    colors = sns.color_palette("husl" if H > 10 else "tab10", H)
    with sns.axes_style(STYLE):
        fig, axes = plt.subplots(1, L, figsize=(4.2 * L + 1.0, 4.2), dpi=DPI, sharey=True, squeeze=False)
        for (layer, head), part in dynamics.sort_values("train_tokens").groupby(["layer", "head"]):
            axes[0, int(layer)].plot(part["train_tokens"], part["mean_normalized_support"], "o-", ms=3, lw=1.4,
                                     color=colors[int(head)], label=f"head {head}")
        top = min(1.0, 1.05 * float(dynamics["mean_normalized_support"].max()))
        for layer, ax in enumerate(axes[0]):
            ax.set(title=f"layer {layer}", xlabel="tokens seen", ylim=(0.0, top))
        axes[0, 0].set_ylabel("mean normalized support (val)")
        _finish(fig, axes[0], "Attention across training: normalized support = support / (position + 1) per head, "
                "falling = sharpening")
    return fig
