"""The one style of every figure: DPI, seaborn theme, and saving (atomic, never half-written)."""

from __future__ import annotations

from pathlib import Path

from attnlab.core.io import atomic_path

FIGURE_DPI = 100  # every figure of the project is saved at this DPI


def save_figure(fig, path: str | Path, **savefig_kwargs) -> None:
    """Write a matplotlib figure as PNG atomically at FIGURE_DPI, without a version stamp, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None}, **savefig_kwargs)
    plt.close(fig)


