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

