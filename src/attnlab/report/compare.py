"""Render DVC experiments side by side: a table, a figure and an HTML page from `dvc.api.exp_show()`.

DVC queues and runs the experiments; this module only renders them (see docs/compare.md):

    dvc exp run --queue -S 'model.pe=rope,none' -S 'seed=1,2'        # DVC expands the grid: 4 experiments
    dvc exp run --run-all -j 1
    python -m attnlab.report.compare --grid 'model.pe=rope,none' 'seed=1,2' \\
        --out reports/compare.html --figure reports/figures/compare_val_loss.png

Which experiments: those of the HEAD commit (exp_show's default) that one of the --grid's produces, i.e. whose
params equal the workspace params.yaml with the -S overrides (the profile, e.g. the quick one) and the grid's
overrides applied; a grid key may take any of its values. A --grid holds the -S specs of one `dvc exp run
--queue` without the `-S`, in DVC's syntax (Hydra overrides: `k=a,b`, `k=range(1,4)`, `k=choice(a,b)`,
`k=[1,2]` is one list value); later specs win, as in DVC. Without --grid: every experiment of HEAD.
Experiments with identical params count once (the newest successful one; exp_show lists newest first).

Grouping: by every param that differs between the selected experiments except `seed`; each metric is the
mean and std (ddof 1) over the group's successful experiments. `--exp-json FILE` renders a saved table,
`json.dumps(dvc.api.exp_show())`, instead of asking DVC.
"""

from __future__ import annotations

import argparse
import base64
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from attnlab.core.errors import ConfigError

# column -> (metrics file, key inside it, flattened with dots as DVC does)
METRICS: dict[str, tuple[str, str]] = {
    "val_loss": ("reports/eval.json", "val_loss"),
    "val_bpb": ("reports/eval.json", "val_bpb"),
    "val_loss_at_2x_seq_len": ("reports/eval.json", "val_loss_at_2x_seq_len"),  # absent for pe=learned
    "n_params": ("reports/eval.json", "n_params"),
    "tokens_per_sec": ("reports/train.json", "tokens_per_sec"),
    "mean_entropy_bits": ("reports/attention.json", "val.mean_entropy_bits"),
}
COUNTS = {"n_params"}  # metrics shown as whole numbers
SEED = "seed"
TEMPLATE = "compare.html"  # in report/templates/, rendered autoescaped by attnlab.report.templating

# ----------------------------------------------------------------------------------- params and grids


def flat_params(path: str | Path) -> dict:
    """params.yaml flattened as DVC flattens it: nested mappings joined with dots, lists kept whole."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a YAML mapping")
    return _flatten(data)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}  # an empty mapping leaves no key, as in DVC
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cell(value):
    """A param value as exp_show reports it: str() of the value, then a float where it parses as one."""
    if value is None:
        return "None"
    if isinstance(value, float):
        return value
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return text


def grid_values(base: dict, specs: list[str]) -> dict[str, list]:
    """key -> the values (as cell()) a param takes in the experiments that `dvc exp run --queue -S spec ...`
    queues on top of the flat params `base`: a sweep's values for swept keys, one value for the others."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(overrides=list(specs))
    except HydraException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("--grid/-S", f"cannot parse {' '.join(specs)} as DVC's -S syntax: {reason}") from None
    allowed = {key: [cell(value)] for key, value in base.items()}
    for override in overrides:
        key = override.key_or_group
        if override.is_delete():
            allowed = {k: v for k, v in allowed.items() if k != key and not k.startswith(key + ".")}
            continue
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException as exc:  # an interval sweep has no finite list of values
            raise ConfigError("--grid/-S", f"{override.input_line!r}: {exc}") from None
        if any(isinstance(v, dict) for v in values):
            if len(values) > 1:
                raise ConfigError("--grid/-S", f"{override.input_line!r}: a sweep over mappings is not supported")
            allowed.update({k: [cell(v)] for k, v in _flatten(values[0], key + ".").items()})
        else:
            allowed[key] = [cell(v) for v in values]
    return allowed


# ------------------------------------------------------------------------------------- experiments


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


def _number(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else math.nan


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
            record[column] = _number(metric_value(row, file, key)) if state == "success" else math.nan
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


def summarize(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per group of the varied params other than seed: n_seeds, then mean and std of each metric over the
    successful experiments; sorted by mean val_loss. Returns (summary, group columns)."""
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
        summary[f"{column}_mean"] = grouped[column].mean()
        summary[f"{column}_std"] = grouped[column].std(ddof=1)  # NaN for a single seed: no error bar
    summary = summary.reset_index().sort_values("val_loss_mean", na_position="last", kind="stable")
    return summary.reset_index(drop=True), keys


# --------------------------------------------------------------------------------------------- output


def plot(summary: pd.DataFrame, table: pd.DataFrame, keys: list[str]):
    """Validation loss per group: bars at the mean, error bars +- 1 std over seeds, one dot per seed."""
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
    if at_2x.notna().any():  # length generalization: the loss on windows of twice the trained length
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


def _fmt(value: float, column: str) -> str:
    if math.isnan(value):
        return "\u2014"
    return f"{value:,.0f}" if column in COUNTS or abs(value) >= 1000 else f"{value:.4f}"


def _mean_std(mean: float, std: float, column: str) -> str:
    """mean ± std, the std with the mean's precision (tokens/s: whole numbers for both)."""
    if math.isnan(mean) or math.isnan(std):
        return _fmt(mean, column)
    whole = column in COUNTS or abs(mean) >= 1000
    return f"{_fmt(mean, column)} \u00b1 {std:,.0f}" if whole else f"{_fmt(mean, column)} \u00b1 {std:.4f}"


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
                    *(_mean_std(row[f"{m}_mean"], row[f"{m}_std"], m) for m in METRICS)]
                   for _, row in summary.iterrows()],
        "image": base64.b64encode(png).decode("ascii"),
        "exp_head": ["experiment", "rev", "created", "state", *(p.removeprefix("params.") for p in params), *METRICS],
        "experiments": [[row["name"], row["rev"], row["created"], row["state"], *(show(row[p]) for p in params),
                         *(_fmt(row[m], m) for m in METRICS)] for _, row in table.iterrows()],
    }


def variant_name(row: pd.Series) -> str:
    """A group's short name: the non-linear Q/K/V variant when any head is non-linear, else its model.pe."""
    heads = row.get("params.model.qkv_nonlinear_heads", "[]")
    if heads not in ("[]", "", "\u2014", None):
        return f"nonlinear_qkv {heads}"
    return str(row.get("params.model.pe", row["variant"]))


MARKDOWN_METRICS = ["val_loss", "val_bpb", "val_loss_at_2x_seq_len", "mean_entropy_bits", "tokens_per_sec"]


def markdown_table(summary: pd.DataFrame) -> str:
    """One row per group: its name, then `mean ± std` over its seeds of each of MARKDOWN_METRICS."""
    head = ["variant", "seeds", *MARKDOWN_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, row in summary.iterrows():
        cells = [variant_name(row), str(row["n_seeds"]),
                 *(_mean_std(row[f"{m}_mean"], row[f"{m}_std"], m) for m in MARKDOWN_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ rendering


class Selection:
    """Which experiments to render: the grids (each a dict key -> allowed values, see grid_values) on top of
    the params file and the -S profile, parsed and checked before DVC is asked anything."""

    def __init__(self, params_path: str | Path, sets: list[str] = (), grids: list[list[str]] = ()):
        self.sets, self.grids = list(sets), [list(g) for g in grids]
        self.params_path = params_path
        base = flat_params(params_path)
        self.selectors = [grid_values(base, [*self.sets, *grid]) for grid in self.grids]
        self.keys = sorted(set(base).union(*self.selectors))

    def describe(self) -> str:
        grids = f" in the grid(s) {' | '.join(' '.join(g) for g in self.grids)}" if self.grids else ""
        return grids + (f" on top of {' '.join(self.sets)}" if self.sets else "")


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


def render(rows: list[dict], selection: Selection, out: str | Path, figure: str | Path
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the figure (PNG) and the HTML page; returns (experiments, summary)."""
    from attnlab.core.io import write_text
    from attnlab.report.style import save_figure
    from attnlab.report.templating import render as render_template

    table, sentence = load_experiments(rows, selection)
    summary, keys = summarize(table)
    save_figure(plot(summary, table, keys), figure)
    title = f"attnlab: {Path(out).stem}"
    context = page_context(title, table, summary, keys, Path(figure).read_bytes(), sentence)
    write_text(out, render_template(TEMPLATE, **context))  # autoescaped: names and values from DVC are text
    return table, summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnlab.report.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="+", action="append", default=[], metavar="SPEC",
                        help="the -S specs (without -S) of one `dvc exp run --queue`; repeat for a union")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="SPEC",
                        help="an override every grid was queued with (the profile), as in dvc exp run -S")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: here)")
    parser.add_argument("--params", default=None, help="the params file the grids apply to (default REPO/params.yaml)")
    parser.add_argument("--exp-json", default=None, help="render this saved json.dumps(dvc.api.exp_show())")
    parser.add_argument("--out", default="reports/compare.html")
    parser.add_argument("--figure", default="reports/figures/compare_val_loss.png")
    parser.add_argument("--markdown", default=None, help="also write the per-group table as markdown here")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    selection = Selection(args.params or Path(args.repo) / "params.yaml", args.sets, args.grid)  # checks first
    rows = read_rows(args.repo, args.exp_json)
    table, summary = render(rows, selection, args.out, args.figure)
    if args.markdown:
        from attnlab.core.io import write_text

        write_text(args.markdown, markdown_table(summary))
    print(f"compare: {len(table)} experiments ({int((table['state'] == 'success').sum())} succeeded) in "
          f"{len(summary)} group(s) -> {args.out}, {args.figure}")


if __name__ == "__main__":
    from attnlab.core.cli import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
