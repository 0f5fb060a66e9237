"""Compare variants as DVC experiments: queue them, then render a table and a figure from `dvc exp show --json`.

    python -m attnlab.compare --queue [-S key=value ...] [--seeds N] [--grid key=v1,v2 ...]
    dvc exp run --run-all -j 2                      # runs the queue, waits until every experiment is done
    python -m attnlab.compare --out reports/compare.html --figure reports/figures/compare_val_loss.png

Queueing: one `dvc exp run --queue -n <name> -S ...` per variant and seed 1..compare.seeds, on top of the
workspace's params (plus any -S given, e.g. the quick profile). Without --grid the variants are the PE
variants and the non-linear Q/K/V variant; with --grid they are the cartesian product of the given lists
(`make sweep` reuses this). Every variant's params are validated with attnlab.config before anything is
queued.

Rendering: the experiments of the current baseline commit whose names start with --prefix. `dvc exp show
--json` (DVC 3.x) gives a list of rows: the workspace, then the baseline commit, whose "experiments" list
holds {"name", "executor": {"state": ...} | null, "revs": [{"rev", "error", "data": {"params": {"params.yaml":
{"data": {...}}}, "metrics": {"<file>": {"data": {...}}}}}]}. A failed experiment still carries the
baseline's metrics there, so metrics are read only from experiments whose state is success.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from attnlab.config import ConfigError, load_params

# (variant name, -S overrides). Each runs on top of the workspace params.
VARIANTS: list[tuple[str, list[str]]] = [
    *((f"pe-{pe}", [f"model.pe={pe}"]) for pe in ("rope", "rope_model_dim", "sinusoidal", "learned", "none", "complex")),
    ("qkv-nonlinear", ["model.qkv_nonlinear_heads=[all]"]),
]

# column -> (metrics file, key path inside it)
METRICS: dict[str, tuple[str, str]] = {
    "val_loss": ("reports/eval.json", "val_loss"),
    "val_bpb": ("reports/eval.json", "val_bpb"),
    "n_params": ("reports/eval.json", "n_params"),
    "tokens_per_sec": ("reports/train.json", "tokens_per_sec"),
    "mean_entropy_bits": ("reports/attention.json", "val.mean_entropy_bits"),
}
ALWAYS_SHOWN = ("model.pe", "model.qkv_nonlinear_heads", "seed")  # params shown even when they do not vary
DEFAULT_PREFIX = "cmp"

# --------------------------------------------------------------------------------------------- queueing


def parse_set(spec: str) -> tuple[str, object]:
    """'model.pe=none' -> ('model.pe', 'none'); the value is read as YAML, as `dvc exp run -S` does."""
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise ConfigError("-S", f"{spec!r} is not key=value")
    return key, yaml.safe_load(value) if value else ""


def overrides_dict(sets: list[str]) -> dict:
    """-S specs -> a nested dict for attnlab.config.load_params(overrides=...)."""
    out: dict = {}
    for spec in sets:
        key, value = parse_set(spec)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.") or "x"


def variant_plan(
    variants: list[tuple[str, list[str]]], seeds: list[int], prefix: str = DEFAULT_PREFIX
) -> list[tuple[str, list[str]]]:
    """(experiment name, -S overrides) for each variant and seed: e.g. ('cmp-pe-none-s1', [model.pe=none, seed=1])."""
    return [(f"{prefix}-{name}-s{seed}", [*sets, f"seed={seed}"]) for name, sets in variants for seed in seeds]


def grid_variants(grid: list[str]) -> list[tuple[str, list[str]]]:
    """['model.d_model=128,256', 'train.lr=0.001,0.003'] -> one variant per combination, named by its values."""
    axes = []
    for spec in grid:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError("--grid", f"{spec!r} is not key=value1,value2,...")
        axes.append([(key, v) for v in values.split(",")])
    variants = []
    for combo in itertools.product(*axes):
        name = "-".join(_slug(f"{key.rsplit('.', 1)[-1]}{value}") for key, value in combo)
        variants.append((name, [f"{key}={value}" for key, value in combo]))
    return variants


def queue_variants(
    plan: list[tuple[str, list[str]]],
    extra_sets: list[str] = (),
    params_path: str | Path = "params.yaml",
    repo_dir: str | Path = ".",
    dry_run: bool = False,
) -> list[list[str]]:
    """Queue one `dvc exp run --queue` per plan entry; returns the commands. Validates every entry first."""
    commands = []
    for name, sets in plan:
        all_sets = [*extra_sets, *sets]  # the plan's own settings win over the profile's
        try:
            load_params(Path(repo_dir) / params_path, overrides=overrides_dict(all_sets))
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} (in experiment {name})") from None
        command = ["dvc", "exp", "run", "--queue", "-n", name]
        for spec in all_sets:
            command += ["-S", spec]
        commands.append(command)
    if not dry_run:
        for command in commands:
            subprocess.run(_dvc(command), cwd=repo_dir, check=True)
    return commands


def _dvc(command: list[str]) -> list[str]:
    """Run dvc with this interpreter's installation, whatever PATH says."""
    return [sys.executable, "-m", "dvc", *command[1:]] if command[:1] == ["dvc"] else command


# -------------------------------------------------------------------------------------------- reading


def read_exp_show(repo_dir: str | Path = ".", json_path: str | Path | None = None) -> list:
    """The parsed output of `dvc exp show --json` run in repo_dir, or read from json_path."""
    if json_path is not None:
        path = Path(json_path)
        if not path.exists():
            raise ConfigError(str(path), "exp show JSON not found")
        text = path.read_text(encoding="utf-8")
    else:
        proc = subprocess.run(_dvc(["dvc", "exp", "show", "--json"]), cwd=repo_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError("dvc exp show", proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
        text = proc.stdout
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(json_path or "dvc exp show --json"), f"is not JSON: {exc}") from None
    if not isinstance(rows, list):
        raise ConfigError(str(json_path or "dvc exp show --json"), "expected a JSON list of revisions (DVC 3.x)")
    return rows


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_text(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def experiments_table(rows: list, prefix: str | None = DEFAULT_PREFIX) -> pd.DataFrame:
    """One row per experiment of the baseline commit(s): name, rev, state, params.yaml (flattened, as
    `params.<key>` text) and the METRICS columns (NaN unless the experiment succeeded)."""
    records = []
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name") or ""
            if prefix and not name.startswith(prefix):
                continue
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            state = (exp.get("executor") or {}).get("state") or ("failed" if rev.get("error") else "success")
            if rev.get("error"):
                state = "failed"
            record = {"name": name, "rev": (rev.get("rev") or "")[:7], "state": state}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            record.update({f"params.{k}": _param_text(v) for k, v in _flatten(params).items()})
            metrics = data.get("metrics") or {}
            for column, (file, key) in METRICS.items():
                value = _flatten((metrics.get(file) or {}).get("data") or {}).get(key)
                ok = state == "success" and isinstance(value, (int, float)) and not isinstance(value, bool)
                record[column] = float(value) if ok else math.nan
            records.append(record)
    return pd.DataFrame(records, columns=None if records else ["name", "rev", "state", *METRICS])


def varied_params(table: pd.DataFrame) -> list[str]:
    """params.* columns whose values differ between experiments, plus ALWAYS_SHOWN where present."""
    columns = [c for c in table.columns if c.startswith("params.")]
    varied = [c for c in columns if table[c].astype(str).nunique() > 1]
    always = [f"params.{key}" for key in ALWAYS_SHOWN if f"params.{key}" in table.columns]
    return [c for c in columns if c in varied or c in always]


def variant_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Group experiments by their varied params other than the seed: n_seeds, then mean and std per metric."""
    keys = [c for c in varied_params(table) if c != "params.seed"]
    done = table[table["state"] == "success"]
    if done.empty:
        return pd.DataFrame(columns=["variant", "n_seeds"])
    if keys:
        done = done.assign(variant=done[keys].astype(str).agg(" ".join, axis=1))
    else:
        done = done.assign(variant="all")
    grouped = done.groupby("variant", sort=False)
    summary = grouped.size().rename("n_seeds").to_frame()
    for column in METRICS:
        summary[f"{column}_mean"] = grouped[column].mean()
        summary[f"{column}_std"] = grouped[column].std(ddof=1)  # NaN for a single seed: no error bar
    return summary.reset_index()


# ------------------------------------------------------------------------------------------- rendering


def plot_compare(summary: pd.DataFrame, table: pd.DataFrame):
    """Validation loss per variant: bars at the mean, error bars +- 1 std over seeds, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    summary = summary.sort_values("val_loss_mean", na_position="last").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(summary) + 2), 4.5))
    x = range(len(summary))
    yerr = summary["val_loss_std"].fillna(0.0)
    ax.bar(x, summary["val_loss_mean"], yerr=yerr, capsize=4, color=sns.color_palette()[0], alpha=0.8)
    keys = [c for c in varied_params(table) if c != "params.seed"]
    done = table[table["state"] == "success"]
    labels = done[keys].astype(str).agg(" ".join, axis=1) if keys else pd.Series("all", index=done.index)
    for i, variant in enumerate(summary["variant"]):
        losses = done.loc[labels == variant, "val_loss"]
        ax.scatter([i] * len(losses), losses, color="black", s=12, zorder=3)
    ax.set_xticks(list(x), summary["variant"], rotation=30, ha="right")
    finite = summary["val_loss_mean"].dropna()
    if len(finite):
        low = float((finite - yerr[finite.index]).min())
        high = float((finite + yerr[finite.index]).max())
        ax.set_ylim(max(0.0, low - 0.1 * (high - low + 0.1)), high + 0.1 * (high - low + 0.1))
    ax.set_xlabel("variant (" + ", ".join(k.removeprefix("params.") for k in keys) + ")" if keys else "variant")
    ax.set_ylabel("validation loss (nats/token)")
    seeds = int(summary["n_seeds"].max()) if len(summary) else 0
    ax.set_title(f"Validation loss per variant (mean +- std over up to {seeds} seed(s))")
    fig.tight_layout()
    return fig


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "&mdash;"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return html.escape(str(value))


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "&mdash;"
    return _cell(mean) if math.isnan(std) else f"{_cell(mean)} &plusmn; {_cell(std)}"


def render_html(table: pd.DataFrame, summary: pd.DataFrame, figure_png: bytes) -> str:
    """A self-contained page: the variant summary, the figure (inline PNG), and every experiment."""
    params = varied_params(table)
    head = ["experiment", "state", *(p.removeprefix("params.") for p in params), *METRICS]
    rows = []
    for _, row in table.iterrows():
        cells = [row["name"], row["state"], *(row[p] for p in params), *(row[m] for m in METRICS)]
        rows.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    summary_rows = []
    for _, row in summary.iterrows():
        cells = [html.escape(str(row["variant"])), str(row["n_seeds"])]
        cells += [_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        summary_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    image = base64.b64encode(figure_png).decode("ascii")
    th = lambda names: "<tr>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"  # noqa: E731
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attnlab: variant comparison</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }} th {{ background: #f0f0f0; }}
td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>Variant comparison</h1>
<p>{len(table)} experiments from <code>dvc exp show --json</code>; metrics are mean &plusmn; std over seeds
(std only where a variant ran with several seeds). val_loss in nats/token, val_bpb in bits per byte,
tokens_per_sec in training tokens per second, mean_entropy_bits the mean attention entropy on validation.</p>
<h2>Per variant</h2>
<table>{th(["variant", "seeds", *METRICS])}{"".join(summary_rows)}</table>
<img alt="validation loss per variant" src="data:image/png;base64,{image}">
<h2>Per experiment</h2>
<table>{th(head)}{"".join(rows)}</table>
</body></html>
"""


def render(rows: list, out: str | Path, figure: str | Path, prefix: str | None = DEFAULT_PREFIX) -> pd.DataFrame:
    """Write the HTML page and the PNG figure; returns the per-experiment table."""
    from attnlab.io import write_bytes, write_text

    table = experiments_table(rows, prefix)
    if table.empty:
        what = f"named {prefix}-*" if prefix else "at all"
        raise ConfigError("dvc exp show", f"no experiments {what} on this commit: run `make compare` first")
    summary = variant_summary(table)
    fig = plot_compare(summary, table)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    write_bytes(figure, buffer.getvalue())
    write_text(out, render_html(table, summary, buffer.getvalue()))
    return table


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnlab.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", action="store_true", help="queue the experiments instead of rendering")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[], help="key=value on top of params")
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,...: queue this grid instead")
    parser.add_argument("--seeds", type=int, default=0, help="seeds 1..N per variant (default compare.seeds)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="experiment name prefix ('' = all when rendering)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands, queue nothing")
    parser.add_argument("--out", default="reports/compare.html")
    parser.add_argument("--figure", default="reports/figures/compare_val_loss.png")
    parser.add_argument("--exp-json", default=None, help="read this `dvc exp show --json` output instead")
    args = parser.parse_args(argv)

    if args.queue:
        params = load_params(args.params, overrides=overrides_dict(args.sets))
        n_seeds = args.seeds or params.compare.seeds
        variants = grid_variants(args.grid) if args.grid else VARIANTS
        plan = variant_plan(variants, list(range(1, n_seeds + 1)), args.prefix)
        commands = queue_variants(plan, args.sets, args.params, dry_run=args.dry_run)
        for command in commands if args.dry_run else []:
            print(shlex.join(command))
        print(f"compare: {'planned' if args.dry_run else 'queued'} {len(commands)} experiments "
              f"({len(variants)} variants x {n_seeds} seeds)")
        return
    table = render(read_exp_show(".", args.exp_json), args.out, args.figure, args.prefix or None)
    print(f"compare: {len(table)} experiments ({(table['state'] == 'success').sum()} succeeded) -> "
          f"{args.out}, {args.figure}")


if __name__ == "__main__":
    from attnlab.cli import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
