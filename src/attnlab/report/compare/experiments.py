"""The experiments to compare, collected from `dvc.api.exp_show()`: one row per experiment with its params and
metrics, those of the selected grids kept, duplicates dropped, ordered by their params.

exp_show lists HEAD's experiments newest first, one dict per row: `rev`, `typ` ("baseline" for the workspace
and HEAD), `Experiment` (the name), `Created`, `State`, then every param and metric flattened with dots. A
metric is named `file:name` only where `name` alone is ambiguous, and is "!" where a run wrote none.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd

from attnlab.core.errors import ConfigError
from attnlab.report.compare.grid import Selection

# column -> (metrics file, key inside it, flattened with dots as DVC does)
METRICS: dict[str, tuple[str, str]] = {
    "val_loss": ("reports/eval.json", "val_loss"),
    "val_bpb": ("reports/eval.json", "val_bpb"),
    "val_loss_at_1x_seq_len": ("reports/eval.json", "val_loss_at_1x_seq_len"),  # the paired length test's 1x
    "val_loss_at_2x_seq_len": ("reports/eval.json", "val_loss_at_2x_seq_len"),  # absent for pe=learned
    "val_loss_at_4x_seq_len": ("reports/eval.json", "val_loss_at_4x_seq_len"),
    "n_params": ("reports/eval.json", "n_params"),
    "tokens_per_sec": ("reports/train.json", "tokens_per_sec"),
    "mean_entropy_bits": ("reports/attention.json", "val.mean_entropy_bits"),
}
SEED = "seed"


def read_rows(repo: str | Path = ".", exp_json: str | Path | None = None) -> list[dict]:
    """dvc.api.exp_show(repo) (HEAD and its experiments), or the same table saved as JSON in exp_json."""
    if exp_json is not None:
        import json

        path = Path(exp_json)
        if not path.is_file():
            raise ConfigError(str(path), "saved exp_show table not found")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"is not JSON: {exc}") from None
    else:
        import dvc.api

        try:
            rows = dvc.api.exp_show(repo=str(repo))
        except Exception as exc:  # noqa: BLE001 - a DvcException, or an OSError on a queue entry DVC lost
            raise ConfigError("dvc.api.exp_show", f"failed in {repo}: {type(exc).__name__}: {exc} "
                              "(see `dvc exp show` and `dvc queue status`)") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(str(exp_json or "dvc.api.exp_show"), "expected a list of rows (dicts), as exp_show returns")
    return rows


def metric_value(row: dict, file: str, name: str):
    """The value of `name` from `file`: DVC names a column `file:name` only where `name` is ambiguous."""
    qualified = f"{file}:{name}"
    return row[qualified] if qualified in row else row.get(name)


def number(value) -> float:
    """A value as a float: NaN for anything but a number (missing, "!" where a run wrote none, a bool)."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan


def metric(row: dict, file: str, name: str) -> float:
    """The metric `name` of `file` in an exp_show row, as a float (NaN where the row has none)."""
    return number(metric_value(row, file, name))


def experiments_table(rows: list[dict], param_keys: list[str], params_file: str = "params.yaml") -> pd.DataFrame:
    """One row per experiment (the baselines, workspace and HEAD, are left out), in exp_show's order: name,
    rev, created, state, `params.<key>` for every key of param_keys (as cell()), and the METRICS columns."""
    records = []
    for row in rows:
        if row.get("typ") == "baseline" or not row.get("rev"):
            continue
        state = str(row.get("State") or "success").lower()  # no State: a finished run whose task is gone
        record = {"name": row.get("Experiment") or row["rev"], "rev": row["rev"],
                  "created": row.get("Created") or "", "state": state}
        for key in param_keys:
            value = metric_value(row, params_file, key)
            record[f"params.{key}"] = "None" if value is None else value
        for column, (file, key) in METRICS.items():
            record[column] = metric(row, file, key) if state == "success" else math.nan
        records.append(record)
    columns = ["name", "rev", "created", "state", *(f"params.{k}" for k in param_keys), *METRICS]
    return pd.DataFrame.from_records(records, columns=columns)


def select(table: pd.DataFrame, grids: list[dict[str, list]]) -> pd.DataFrame:
    """The experiments whose params fall in one of the grids (all of them without grids)."""
    if not grids:
        return table

    def in_grid(row, grid) -> bool:
        return all(row.get(f"params.{key}", "None") in values for key, values in grid.items())

    keep = [any(in_grid(row, grid) for grid in grids) for row in table.to_dict("records")]
    return table[keep]


def drop_duplicates(table: pd.DataFrame) -> pd.DataFrame:
    """One experiment per set of params: the first successful one in exp_show's (newest first) order."""
    params = [c for c in table.columns if c.startswith("params.")]
    ranked = table.assign(_failed=table["state"] != "success").sort_values("_failed", kind="stable")
    keyed = ranked[params].astype(str).agg("\x1f".join, axis=1) if params else pd.Series("", index=ranked.index)
    return ranked[~keyed.duplicated()].drop(columns="_failed").sort_index()


def varied_params(table: pd.DataFrame) -> list[str]:
    """The params.* columns whose value differs between the experiments."""
    return [c for c in table.columns if c.startswith("params.") and table[c].astype(str).nunique() > 1]


def sort_by_params(table: pd.DataFrame) -> pd.DataFrame:
    """Experiments ordered by their varied params (numbers as numbers), seed last."""
    params = sorted(varied_params(table), key=lambda c: c == f"params.{SEED}")

    def key(index) -> tuple:
        return tuple((0, v, "") if isinstance(v, float) else (1, 0.0, str(v)) for v in table.loc[index, params])

    return table.loc[sorted(table.index, key=key)].reset_index(drop=True)


def show(value) -> str:
    """A param value for the page: integral floats without '.0' (exp_show turns 3 into 3.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_experiments(rows: list[dict], selection: Selection) -> tuple[pd.DataFrame, str]:
    """The selected, de-duplicated experiments and a sentence saying how they were chosen."""
    table = experiments_table(rows, selection.keys)
    if table.empty:
        raise ConfigError("dvc exp show", "no experiments on HEAD: queue and run them first (make compare)")
    chosen = select(table, selection.selectors)
    if chosen.empty:
        raise ConfigError("--grid", f"none of the {len(table)} experiments of HEAD is{selection.describe()} "
                          f"(params from {selection.params_path}): were they queued with other params or profile?")
    unique = sort_by_params(drop_duplicates(chosen))
    done = int((unique["state"] == "success").sum())
    dropped = len(chosen) - len(unique)
    sentence = (f"{len(unique)} experiments of HEAD ({done} succeeded) out of {len(table)}{selection.describe()}"
                + (f"; {dropped} duplicate(s) with identical params left out" if dropped else ""))
    return unique, sentence
