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
    """loss_by_position.png: the loss at each position of the window (how much the model gains from context),
    at the trained length and, where evaluate scored it, at twice that length."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    if "loss_2x" in curves:
        ax.plot(curves["position_2x"], curves["loss_2x"], color="tab:red", linewidth=1.2,
                label=f"windows of 2 x seq_len (mean {metrics.get('val_loss_at_2x_seq_len', float('nan')):.3f})")
    ax.plot(curves["position"], curves["loss"], color="tab:blue", linewidth=1.8,
            label=f"windows of seq_len (mean {metrics.get('val_loss', float('nan')):.3f})")
    if curves["position"]:
        ax.axvline(len(curves["position"]) - 0.5, color="black", ls=":", label="trained length")
    if "unigram_loss" in metrics:
        ax.axhline(metrics["unigram_loss"], color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("position in the window (tokens of context before the target)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("Loss by position: the gain from context, and past the trained length")
    ax.legend()
    fig.tight_layout()
    return fig
