"""Figures about positional encoding: the sinusoidal table, and where position lives in the trained model.

Each plot function takes arrays or a DataFrame and returns a matplotlib Figure; save_figure writes it
atomically. PE_FIGURES lists the files with their captions, as the registry (attnlab.report.registry) has them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from attnlab.report import registry, style  # noqa: E402

PE_FIGURES = [(f.name, f.caption) for f in registry.in_section("Positional encoding")]  # from the registry


def _style() -> None:
    sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """attnlab.style.save_figure, cropped to the drawn area."""
    style.save_figure(fig, path, bbox_inches="tight")


def plot_pe_heatmap(table: np.ndarray, base: float = 10000.0) -> plt.Figure:
    """table (T, D): the sinusoidal encoding, drawn as position (rows) x dimension (columns)."""
    _style()
    T, D = table.shape
    fig, ax = plt.subplots(figsize=(10, 5))
    image = ax.imshow(table, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", origin="upper")
    ax.grid(False)
    ax.set_xlabel("dimension (index into the d_model vector)")
    ax.set_ylabel("position (tokens)")
    ax.set_title(f"Sinusoidal positional encoding: seq_len={T}, d_model={D}, base={base:g}")
    fig.colorbar(image, ax=ax, label="encoding value")
    return fig


def plot_dimension_variance(variance: pd.DataFrame, adjusted: bool = True) -> plt.Figure:
    """Heatmaps point x dimension of the variance share explained by position (top) and by token (bottom).

    variance: the first frame of attnlab.probes.position_analysis.
    """
    _style()
    suffix = "_adjusted" if adjusted else ""
    points = variance.drop_duplicates("point_index").sort_values("point_index")["point"].tolist()
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.2 + 0.9 * len(points) * 2), sharex=True)
    for ax, what in zip(axes, ("position", "token")):
        grid = variance.pivot(index="point_index", columns="dimension", values=f"{what}_share{suffix}")
        vmax = max(0.05, float(grid.to_numpy().max()))  # own scale per panel: position shares are often small
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.grid(False)
        ax.set_yticks(range(len(points)), points)
        ax.set_ylabel("residual stream point")
        ax.set_title(f"share of each dimension's variance explained by {what}")
        fig.colorbar(image, ax=ax, label="variance share")
    axes[-1].set_xlabel("residual dimension (index into d_model)")
    kind = "epsilon^2, chance-corrected" if adjusted else "eta^2"
    fig.suptitle(f"Where position lives: position vs token variance per dimension ({kind})")
    fig.tight_layout()
    return fig


def plot_position_probe(probe: pd.DataFrame) -> plt.Figure:
    """Held-out R^2 of the linear position probe at each residual point (the second frame of position_analysis)."""
    _style()
    probe = probe.sort_values("point_index")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(probe["point"], probe["r2"], marker="o")
    for x, r2 in enumerate(probe["r2"]):
        ax.annotate(f"{r2:.3f}", (x, r2), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_ylim(min(0.0, float(probe["r2"].min()) - 0.05), 1.08)
    ax.set_xlabel("residual stream point (embedding output, then each layer's output)")
    ax.set_ylabel("held-out R^2 (absolute position)")
    ax.set_title("Linear probe for the absolute position, per layer")
    fig.tight_layout()
    return fig


def pe_heatmap(seq_len: int, d_model: int) -> plt.Figure:
    """The figure pe_heatmap.png for model.seq_len x model.d_model (the table attnlab.model adds for pe=sinusoidal)."""
    from attnlab.core.errors import ConfigError
    from attnlab.model.positional import sinusoidal_table

    if d_model % 2:
        raise ConfigError("model.d_model", f"{d_model} is odd; the sinusoidal table pairs sin and cos dimensions")
    return plot_pe_heatmap(sinusoidal_table(seq_len, d_model).numpy())
