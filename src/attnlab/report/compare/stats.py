"""Statistics over seeds: the mean and sample std of a metric, its 95% interval, and the per-group summary.

A group is the experiments that share every varied param but the seed; its metrics are the mean and std
(ddof 1) over its successful experiments. One seed gives a mean without a std (no error bar). The 95% interval
of a mean over n seeds is Student's t: mean +- t(0.975, n - 1) * std / sqrt(n) (4.30 * std / sqrt(3) for 3).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import pandas as pd

from attnlab.report.compare.experiments import METRICS, SEED, number, show, varied_params


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the numbers among the values (see number(); NaNs left out): the std is
    NaN for one number, both are for none."""
    numbers = [v for v in map(number, values) if not math.isnan(v)]
    if not numbers:
        return math.nan, math.nan
    if len(numbers) == 1:
        return numbers[0], math.nan
    return statistics.mean(numbers), statistics.stdev(numbers)


# t(0.975, df) for df = 1..30; past 30 the normal quantile, 1.96, is within 4% of it.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def interval95(values: Iterable[float]) -> tuple[float, float]:
    """The mean of the numbers among the values and the half-width of its 95% t interval (NaN for one number)."""
    numbers = [v for v in map(number, values) if not math.isnan(v)]
    mean, std = mean_std(numbers)
    n = len(numbers)
    if n < 2:
        return mean, math.nan
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)


def summarize(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per group of the varied params other than seed: n_seeds, then `<metric>_mean` and `<metric>_std` of each
    metric over the successful experiments; sorted by mean val_loss. Returns (summary, group columns)."""
    keys = [c for c in varied_params(table) if c != f"params.{SEED}"]
    done = table[table["state"] == "success"]
    labels = done[keys].map(show) if keys else pd.DataFrame(index=done.index)
    done = done.assign(variant=labels.agg(", ".join, axis=1) if keys else "all")
    if done.empty:
        return pd.DataFrame(columns=["variant", *keys, "n_seeds"]), keys
    grouped = done.groupby("variant", sort=False)
    summary = grouped.size().rename("n_seeds").to_frame()
    for key in keys:
        summary[key] = grouped[key].first().map(show)
    for column in METRICS:
        pairs = {variant: mean_std(values) for variant, values in grouped[column]}
        summary[f"{column}_mean"] = [pairs[variant][0] for variant in summary.index]
        summary[f"{column}_std"] = [pairs[variant][1] for variant in summary.index]
    summary = summary.reset_index().sort_values("val_loss_mean", na_position="last", kind="stable")
    return summary.reset_index(drop=True), keys
