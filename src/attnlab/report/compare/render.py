"""The comparison drawn and written: the validation-loss figure, the HTML page (report/templates/compare.html,
autoescaped: names and values from DVC are text) and the per-group table as markdown."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pandas as pd

from attnlab.core.io import write_text
from attnlab.report.compare.experiments import METRICS, SEED, load_experiments, show, varied_params
from attnlab.report.compare.grid import Selection
from attnlab.report.compare.stats import mean_std, summarize
from attnlab.report.style import save_figure
from attnlab.report.templating import render as render_template

TEMPLATE = "compare.html"
COUNTS = {"n_params"}  # metrics shown as whole numbers
MARKDOWN_METRICS = ["val_loss", "val_bpb", "val_loss_at_2x_seq_len", "mean_entropy_bits", "tokens_per_sec"]


def format_mean_std(mean: float, std: float, digits: int, thousands: bool = False) -> str:
    """`mean ± std` with `digits` decimals (`thousands`: with thousands separators); the mean alone where the
    std is NaN, and an em dash where the mean is."""
    if math.isnan(mean):
        return "\u2014"
    spec = f"{',' if thousands else ''}.{digits}f"
    return format(mean, spec) if math.isnan(std) else f"{mean:{spec}} \u00b1 {std:{spec}}"


def mean_std_text(values: list[float], digits: int = 3) -> str:
    """`mean ± std` of the values (NaNs left out) with `digits` decimals: the mean alone for one value."""
    return format_mean_std(*mean_std(values), digits)


def interval_text(mean: float, half: float, signed: bool = False) -> str:
    """`mean ± half` rounded to what the interval supports: the half-width's first significant digit sets the
    decimals (± 0.013 -> 2, ± 0.004 -> 3; at most 4); the mean alone, to 4 decimals, without a half-width."""
    if math.isnan(mean):
        return "\u2014"
    sign = "+" if signed else ""
    if math.isnan(half):
        return f"{mean:{sign}.4f}"
    digits = 4 if half <= 0 else min(4, max(0, -math.floor(math.log10(half))))
    return f"{mean:{sign}.{digits}f} \u00b1 {half:.{digits}f}"


def metric_text(mean: float, column: str, std: float = math.nan) -> str:
    """A metric (or its mean ± std) for the page: 4 decimals, or whole numbers for counts and values >= 1000."""
    whole = column in COUNTS or abs(mean) >= 1000
    return format_mean_std(mean, std, 0, thousands=True) if whole else format_mean_std(mean, std, 4)


def plot(summary: pd.DataFrame, table: pd.DataFrame, keys: list[str]):
    """Validation loss per group: bars at the mean, error bars +- 1 std over seeds, one dot per seed, and red
    diamonds at the loss on windows of twice the trained length where a group has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(summary) + 2), 4.5))
    if summary.empty or summary["val_loss_mean"].isna().all():
        ax.text(0.5, 0.5, "no successful experiment with a val_loss", ha="center", va="center")
        return fig
    x = list(range(len(summary)))
    yerr = summary["val_loss_std"].fillna(0.0)
    ax.bar(x, summary["val_loss_mean"], yerr=yerr, capsize=4, color=sns.color_palette()[0], alpha=0.8)
    done = table[table["state"] == "success"]
    for i, row in summary.iterrows():
        same = pd.Series(True, index=done.index)
        for key in keys:
            same &= done[key].map(show) == row[key]
        ax.scatter([i] * int(same.sum()), done.loc[same, "val_loss"], color="black", s=12, zorder=3)
    at_2x = summary["val_loss_at_2x_seq_len_mean"]
    if at_2x.notna().any():
        ax.errorbar(x, at_2x, yerr=summary["val_loss_at_2x_seq_len_std"].fillna(0.0), fmt="D", color="tab:red",
                    capsize=3, label="at 2 x seq_len")
        ax.legend()
    ax.set_xticks(x, summary["variant"], rotation=30, ha="right")
    low = float((summary["val_loss_mean"] - yerr).min())
    high = float(pd.concat([summary["val_loss_mean"] + yerr, at_2x]).max())
    margin = 0.1 * (high - low + 0.1)
    ax.set_ylim(max(0.0, low - margin), high + margin)
    ax.set_xlabel(", ".join(k.removeprefix("params.") for k in keys) if keys else "experiments")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Validation loss (mean \u00b1 std over up to {int(summary['n_seeds'].max())} seed(s))")
    fig.tight_layout()
    return fig


def page_context(title: str, table: pd.DataFrame, summary: pd.DataFrame, keys: list[str], png: bytes,
                 selection: str) -> dict:
    """What the template shows: the per-group table, the figure, the per-experiment table."""
    params = sorted(varied_params(table), key=lambda c: c == f"params.{SEED}")  # seed last
    names = [k.removeprefix("params.") for k in keys]
    return {
        "title": title,
        "selection": selection,
        "metrics": list(METRICS),
        "group_head": [*names, "seeds", *METRICS],
        "groups": [[*(row[k] for k in keys), str(row["n_seeds"]),
                    *(metric_text(row[f"{m}_mean"], m, row[f"{m}_std"]) for m in METRICS)]
                   for _, row in summary.iterrows()],
        "image": base64.b64encode(png).decode("ascii"),
        "exp_head": ["experiment", "rev", "created", "state", *(p.removeprefix("params.") for p in params), *METRICS],
        "experiments": [[row["name"], row["rev"], row["created"], row["state"], *(show(row[p]) for p in params),
                         *(metric_text(row[m], m) for m in METRICS)] for _, row in table.iterrows()],
    }


def variant_name(row: pd.Series) -> str:
    """A group's short name: the non-linear Q/K/V variant when any head is non-linear, else its model.pe."""
    heads = row.get("params.model.qkv_nonlinear_heads", "[]")
    if heads not in ("[]", "", "\u2014", None):
        return f"nonlinear_qkv {heads}"
    return str(row.get("params.model.pe", row.get("variant")))


def markdown_table(summary: pd.DataFrame) -> str:
    """One row per group: its name, then `mean ± std` over its seeds of each of MARKDOWN_METRICS."""
    head = ["variant", "seeds", *MARKDOWN_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, row in summary.iterrows():
        cells = [variant_name(row), str(row["n_seeds"]),
                 *(metric_text(row[f"{m}_mean"], m, row[f"{m}_std"]) for m in MARKDOWN_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict], selection: Selection, out: str | Path, figure: str | Path
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the figure (PNG) and the HTML page of the selected experiments; returns (experiments, summary)."""
    table, sentence = load_experiments(rows, selection)
    summary, keys = summarize(table)
    save_figure(plot(summary, table, keys), figure)
    title = f"attnlab: {Path(out).stem}"
    context = page_context(title, table, summary, keys, Path(figure).read_bytes(), sentence)
    write_text(out, render_template(TEMPLATE, **context))
    return table, summary
