"""The training figure: train and validation loss against tokens seen."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from attnlab.report.style import FIGURE_DPI as DPI  # noqa: E402


def loss_curve(log: pd.DataFrame, val_log: pd.DataFrame) -> plt.Figure:
    """log: step, tokens, loss, lr per step; val_log: step, tokens, val_loss."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    if len(log):
        window = max(1, len(log) // 50)
        ax.plot(log["tokens"], log["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        smooth = log["loss"].rolling(window, min_periods=1).mean()
        ax.plot(log["tokens"], smooth, color="tab:blue", linewidth=1.8, label=f"train ({window}-step mean)")
    if len(val_log):
        ax.plot(val_log["tokens"], val_log["val_loss"], "o-", color="tab:orange", linewidth=1.8, label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    return fig



def loss_by_position_figure(curves: dict, metrics: dict) -> plt.Figure:
    """loss_by_position.png. Left: the loss at each position of the window (how much the model gains from
    context), at the trained length and in every longer view evaluate scored (windows of m x seq_len). Right:
    the paired length test, the loss on the same targets against the tokens of context each was given."""
    sns.set_theme(style="whitegrid")
    fig, (ax, paired) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=DPI, width_ratios=(3, 2))
    multiples = curves.get("context_multiples", [1])
    colors = sns.color_palette("flare", max(1, len(multiples) - 1))
    for color, m in reversed(list(zip(colors, multiples[1:]))):  # the longest first: shorter views drawn over it
        if f"loss_{m}x" in curves:
            ax.plot(curves[f"position_{m}x"], curves[f"loss_{m}x"], color=color, linewidth=1.0,
                    label=f"windows of {m} x seq_len (last seq_len: {_metric(metrics, f'val_loss_at_{m}x_seq_len')})")
    ax.plot(curves["position"], curves["loss"], color="tab:blue", linewidth=1.8,
            label=f"windows of seq_len (mean {_metric(metrics, 'val_loss')})")
    if curves["position"]:
        ax.axvline(len(curves["position"]) - 0.5, color="black", ls=":", label="trained length")
    if "unigram_loss" in metrics:
        ax.axhline(metrics["unigram_loss"], color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("position in the window (tokens of context before the target)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("Loss by position: the gain from context, and past the trained length")
    ax.legend(fontsize=8)
    if "paired_loss" in curves:
        paired.plot(curves["context_length"], curves["paired_loss"], "o-", color="tab:red", linewidth=1.8,
                    label=f"{curves.get('paired_tokens', 0):,} targets, the same in every view")
        for length, loss in zip(curves["context_length"], curves["paired_loss"]):
            paired.annotate(f"{loss:.3f}", (length, loss), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8)
        paired.margins(y=0.15)  # room for the labels
        paired.set_xscale("log", base=2)
        paired.set_xticks(curves["context_length"], [str(n) for n in curves["context_length"]])
        paired.legend(fontsize=8)
    paired.set_xlabel("tokens of context (window length)")
    paired.set_ylabel("validation cross-entropy (nats/token)")
    paired.set_title("Paired length test: the same targets, longer context")
    fig.tight_layout()
    return fig


def _metric(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
