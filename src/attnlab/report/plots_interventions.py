"""Figures of the interventions stage: the results table (attnlab.analysis.intervention_sweep.results_table) in, a
Figure out.

Each function draws one figure and returns it; write_intervention_figures draws each figure of DRAW and saves
it atomically at a fixed DPI.
Columns used: kind, setting, layer, head, loss (nats/token), mean_entropy_bits, delta (loss - baseline).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attnlab.report import registry  # noqa: E402
from attnlab.report.style import save_figure  # noqa: E402

STYLE = "whitegrid"

# (file name, caption) of each figure the interventions stage writes, from the registry (attnlab.report.registry).
INTERVENTION_FIGURES = [(f.name, f.caption) for f in registry.of_stage("interventions")]


def _rows(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = table[table["kind"] == kind]
    if rows.empty:
        raise ValueError(f"the results table has no {kind!r} rows")
    return rows


def _baseline(table: pd.DataFrame) -> float:
    return float(_rows(table, "baseline")["loss"].iloc[0])


def plot_temperature(table: pd.DataFrame) -> Figure:
    """Loss and mean attention entropy against tau (log x), all heads at once."""
    rows = _rows(table, "temperature").assign(tau=lambda d: d["setting"].astype(float)).sort_values("tau")
    baseline = _rows(table, "baseline").iloc[0]
    with sns.axes_style(STYLE):
        fig, (ax_loss, ax_ent) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        ax_loss.plot(rows["tau"], rows["loss"], marker="o", label="all heads at tau")
        ax_loss.axhline(baseline["loss"], color="gray", linestyle="--", label="baseline (tau = 1)")
        ax_loss.set(ylabel="validation loss (nats/token)", title="Loss vs attention temperature")
        ax_ent.plot(rows["tau"], rows["mean_entropy_bits"], marker="o", color="tab:orange", label="all heads at tau")
        ax_ent.axhline(baseline["mean_entropy_bits"], color="gray", linestyle="--", label="baseline (tau = 1)")
        ax_ent.set(ylabel="mean attention entropy (bits)", title="Attention entropy vs temperature")
        for ax in (ax_loss, ax_ent):
            ax.set_xscale("log")
            ax.set_xlabel("temperature tau (scores / tau, log scale)")
            ax.set_xticks(rows["tau"].tolist(), [f"{t:g}" for t in rows["tau"]])
            ax.minorticks_off()
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.legend()
        fig.tight_layout()
    return fig


def plot_top_k(table: pd.DataFrame, seq_len: int | None = None) -> Figure:
    """Loss against k (log2 x), all heads keeping their k largest scores. Every k >= seq_len keeps all keys (a query
    sees at most seq_len): those settings are one point, "all keys", one step right of the largest k below it."""
    rows = _rows(table, "top_k").assign(k=lambda d: d["setting"].astype(int)).sort_values("k")
    if seq_len is not None and (rows["k"] >= seq_len).any() and (rows["k"] < seq_len).any():
        below = rows[rows["k"] < seq_len]
        rows = pd.concat([below, rows[rows["k"] >= seq_len].head(1).assign(k=2 * int(below["k"].max()))])
        labels = [str(k) for k in below["k"]] + [f"all keys\n(k >= {seq_len})"]
    else:
        labels = [str(k) for k in rows["k"]]
    with sns.axes_style(STYLE):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(rows["k"], rows["loss"], marker="o", label="all heads top-k")
        ax.axhline(_baseline(table), color="gray", linestyle="--", label="baseline (softmax over all keys)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rows["k"].tolist(), labels)
        ax.minorticks_off()
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set(
            xlabel="k, keys kept per query (log2 scale)",
            ylabel="validation loss (nats/token)",
            title="Loss vs top-k attention",
        )
        ax.legend()
        fig.tight_layout()
    return fig


def plot_head_importance(table: pd.DataFrame) -> Figure:
    """Layer x head heatmap of the loss increase when mean-ablating that head alone, annotated with it and (where
    the table has them) its 95% bootstrap interval over the validation windows."""
    rows = _rows(table, "mean_ablate")
    grid = rows.pivot(index="layer", columns="head", values="delta").sort_index().sort_index(axis=1)  # (L, H)
    if {"delta_low", "delta_high"} <= set(rows.columns):
        text = rows.assign(text=[f"{d:+.3g}\n[{lo:+.3g}, {hi:+.3g}]" for d, lo, hi in
                                 zip(rows["delta"], rows["delta_low"], rows["delta_high"])])
        annot = text.pivot(index="layer", columns="head", values="text").sort_index().sort_index(axis=1)
        annot_args = {"annot": annot.to_numpy(), "fmt": "", "annot_kws": {"fontsize": 7}}
    else:
        annot_args = {"annot": True, "fmt": "+.3g"}  # 3 significant digits: tiny and large increases both readable
    with sns.axes_style("white"):
        n_layers, n_heads = grid.shape
        fig, ax = plt.subplots(figsize=(1.6 * n_heads + 2.5, 0.9 * n_layers + 1.8))
        sns.heatmap(
            grid.astype(float),
            **annot_args,
            cmap="vlag",
            center=0.0,
            cbar_kws={"label": "loss increase (nats/token)"},
            ax=ax,
        )
        ax.set(xlabel="head", ylabel="layer",
               title="Head importance: loss increase when mean-ablated\n[95% bootstrap interval over windows]")
        fig.tight_layout()
    return fig


def plot_uniform(table: pd.DataFrame) -> Figure:
    """Bars: baseline, all heads uniform, and each layer's heads uniform (one layer at a time)."""
    layers = _rows(table, "uniform_layer").assign(layer_n=lambda d: d["setting"].astype(int)).sort_values("layer_n")
    labels = ["baseline", "all heads\nuniform"] + [f"layer {n}\nuniform" for n in layers["layer_n"]]
    losses = [_baseline(table), float(_rows(table, "uniform_all")["loss"].iloc[0])] + layers["loss"].tolist()
    colors = ["tab:gray", "tab:red"] + ["tab:blue"] * len(layers)
    with sns.axes_style(STYLE):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 1.5), 4.2))
        bars = ax.bar(labels, losses, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in losses], padding=2)
        ax.set(ylabel="validation loss (nats/token)", title="Uniform attention: loss vs the trained model")
        ax.set_ylim(0, max(losses) * 1.12)
        fig.tight_layout()
    return fig


# file name -> the function that draws it from the results table; the registry's interventions figures
DRAW = {
    "intervention_temperature.png": plot_temperature,
    "intervention_top_k.png": plot_top_k,
    "head_importance.png": plot_head_importance,
    "intervention_uniform.png": plot_uniform,
}


def write_intervention_figures(table: pd.DataFrame, figures_dir: str | Path, seq_len: int | None = None) -> list[Path]:
    """Draw and save the figures of INTERVENTION_FIGURES (each with its function in DRAW) into figures_dir;
    returns their paths. seq_len, the model's, lets the top-k figure draw k >= seq_len as "all keys"."""
    paths = []
    for name, _ in INTERVENTION_FIGURES:
        path = Path(figures_dir) / name
        draw = DRAW[name]
        save_figure(draw(table, seq_len) if draw is plot_top_k else draw(table), path)
        paths.append(path)
    return paths
