"""The tables of docs/results.md, from the experiments `make results` ran (the HEAD commit's, via dvc exp show).

    python -m attnlab.report.compare.results_tables --out reports/results_tables.md   # the last step of `make results`

Which experiments: the same selection as `make compare` (python -m attnlab.report.compare), with the Makefile's
grids and profile passed the same way (-S for the profile, one --grid per queued grid). Tables:

1. one row per variant (PE grid + non-linear Q/K/V grid): mean ± std over seeds of val loss, bits per byte,
   loss at 2x the trained length, mean attention entropy and training tokens/s (render.markdown_table); then
   the same variants with their parameter counts, 95% intervals over seeds and the paired differences: each
   variant against rope on the same seeds, and each run's loss at 2x and 4x context against its 1x on the same
   targets (variants_table);
2. fp32 against bf16 autocast for the default variant, per seed, when a --grid with train.precision=bf16 ran;
3. the interventions on the default variant (its seeds): the loss under uniform attention, hard top-k,
   temperature, and its change against the unchanged model;
4. head importance: the loss increase when each head is mean-ablated, per layer over seeds, and per seed the
   most and the least important head of each layer with their 95% bootstrap intervals over windows;
5. attention across training: mean normalized support at the first and the last snapshot, per layer.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import pandas as pd

from attnlab.core.cli import run_cli
from attnlab.core.io import write_text
from attnlab.report.compare.cli import add_selection_arguments, selection_of
from attnlab.report.compare.experiments import SEED, load_experiments, metric, read_rows
from attnlab.report.compare.grid import Selection
from attnlab.report.compare.render import interval_text, markdown_table, mean_std_text, variant_name
from attnlab.report.compare.stats import interval95, summarize

INTERVENTIONS = "reports/interventions.json"
DYNAMICS = "reports/attention_dynamics.json"
EVAL = "reports/eval.json"
ROWS = [  # (label, key in interventions.json, flattened as exp_show does)
    ("unchanged model", "baseline.loss"),
    ("uniform attention, every layer", "uniform_all.loss"),
    ("uniform attention, layer 0 only", "uniform_layer.0.loss"),
    ("uniform attention, layer 1 only", "uniform_layer.1.loss"),
    ("hard top-1 (each query attends to its highest-scoring key)", "top_k.1.loss"),
    ("hard top-2", "top_k.2.loss"),
    ("hard top-8", "top_k.8.loss"),
    ("temperature 0.5 (sharper)", "temperature.0.5.loss"),
    ("temperature 2 (flatter)", "temperature.2.0.loss"),
    ("temperature 4", "temperature.4.0.loss"),
]


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def default_runs(experiments: pd.DataFrame, raw: dict[str, dict], precision: str = "auto") -> list[dict]:
    """exp_show rows of the successful default-variant experiments (rope, linear Q/K/V) of that precision."""
    chosen = experiments[(experiments["state"] == "success")
                         & (experiments["params.model.pe"] == "rope")
                         & (experiments["params.model.qkv_nonlinear_heads"].astype(str) == "[]")
                         & (experiments["params.train.precision"] == precision)]
    return [raw[rev] for rev in chosen.sort_values("params.seed")["rev"]]


def per_seed(experiments: pd.DataFrame, column: str) -> dict[str, dict[int, float]]:
    """{variant name: {seed: the column's value}} of the successful experiments."""
    out: dict[str, dict[int, float]] = {}
    for _, row in experiments[experiments["state"] == "success"].iterrows():
        out.setdefault(variant_name(row), {})[int(float(row[f"params.{SEED}"]))] = float(row[column])
    return out


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b on the seeds both have (the same init seed, batch order and validation windows)."""
    return [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]


def variants_table(experiments: pd.DataFrame, reference: str = "rope") -> str:
    """Per variant: parameters, seeds, val_loss with its 95% interval, the paired difference against `reference`
    and the paired length test (2x - 1x, 4x - 1x on each run's own shared targets), entropy, tokens/s."""
    columns = {c: per_seed(experiments, c) for c in ("val_loss", "val_loss_at_1x_seq_len", "val_loss_at_2x_seq_len",
                                                    "val_loss_at_4x_seq_len", "mean_entropy_bits",
                                                    "tokens_per_sec", "n_params")}
    loss = columns["val_loss"]
    rows = []
    for name in sorted(loss, key=lambda n: interval95(loss[n].values())[0]):
        diffs = {m: paired(columns[f"val_loss_at_{m}x_seq_len"][name], columns["val_loss_at_1x_seq_len"][name])
                 for m in (2, 4)}
        params = {int(v) for v in columns["n_params"][name].values() if v == v}
        rows.append([
            name, ", ".join(f"{p:,}" for p in sorted(params)) or "\u2014", str(len(loss[name])),
            interval_text(*interval95(loss[name].values())),
            "" if name == reference else interval_text(*interval95(paired(loss[name], loss.get(reference, {}))),
                                                       signed=True),
            *(interval_text(*interval95(diffs[m]), signed=True) for m in (2, 4)),
            interval_text(*interval95(columns["mean_entropy_bits"][name].values())),
            f"{interval95(columns['tokens_per_sec'][name].values())[0]:,.0f}",
        ])
    head = ["variant", "parameters", "seeds", "val_loss (95% interval)", f"minus {reference}, paired by seed",
            "2x minus 1x context (paired)", "4x minus 1x context (paired)", "mean entropy (bits)", "tokens/s"]
    return table(head, rows)


def interventions_table(runs: list[dict]) -> str:
    base = [metric(r, INTERVENTIONS, "baseline.loss") for r in runs]
    rows = []
    for label, key in ROWS:
        losses = [metric(r, INTERVENTIONS, key) for r in runs]
        deltas = [loss - b for loss, b in zip(losses, base)]
        rows.append([label, interval_text(*interval95(losses)),
                     "" if key == "baseline.loss" else interval_text(*interval95(deltas), signed=True)])
    return table(["intervention (every head unless said)", "val loss (nats, 95% interval over seeds)",
                  "change against the unchanged model (95% interval over seeds)"], rows)


def head_table(runs: list[dict], n_layers: int, n_heads: int) -> str:
    """Per layer: the mean-ablation loss increase of its heads — their mean, the largest and the smallest — each
    mean ± std over seeds. Heads are compared within a run only: head h of one seed is not head h of another."""
    rows = []
    for layer in range(n_layers):
        per_run = [[metric(r, INTERVENTIONS, f"mean_ablate.L{layer}H{head}.delta") for head in range(n_heads)]
                   for r in runs]
        rows.append([f"layer {layer}", mean_std_text([statistics.mean(d) for d in per_run]),
                     mean_std_text([max(d) for d in per_run]), mean_std_text([min(d) for d in per_run])])
    return table(["", "mean over its heads", "most important head", "least important head"], rows)


def head_intervals_table(runs: list[dict], n_layers: int, n_heads: int) -> str:
    """Per seed and layer: the most and the least important head (mean-ablation delta) with their 95% bootstrap
    intervals over the validation windows, and whether those intervals are apart (the two heads differ by more
    than the window-to-window noise of that run)."""
    rows = []
    for seed, r in enumerate(runs, start=1):
        for layer in range(n_layers):
            heads = []
            for head in range(n_heads):
                key = f"mean_ablate.L{layer}H{head}"
                ci = (metric(r, INTERVENTIONS, f"{key}.delta_low"), metric(r, INTERVENTIONS, f"{key}.delta_high"))
                heads.append((metric(r, INTERVENTIONS, f"{key}.delta"), head, ci))
            (top, top_head, top_ci), (low, low_head, low_ci) = max(heads), min(heads)
            known = not any(map(math.isnan, (*top_ci, *low_ci)))
            apart = ("yes" if low_ci[1] < top_ci[0] else "no") if known else "\u2014"
            rows.append([str(seed), f"layer {layer}", f"H{top_head} {top:+.3f} [{top_ci[0]:+.3f}, {top_ci[1]:+.3f}]",
                         f"H{low_head} {low:+.3f} [{low_ci[0]:+.3f}, {low_ci[1]:+.3f}]", apart])
    return table(["run", "layer", "most important head [95% interval]", "least important head [95% interval]",
                  "intervals apart"], rows)


def dynamics_table(runs: list[dict], n_layers: int) -> str:
    rows = []
    for layer in range(n_layers):
        key = f"normalized_support_by_layer.L{layer}"
        first = [metric(r, DYNAMICS, f"{key}.first") for r in runs]
        last = [metric(r, DYNAMICS, f"{key}.last") for r in runs]
        rows.append([f"layer {layer}", mean_std_text(first), mean_std_text(last)])
    tokens = [metric(r, DYNAMICS, "first_train_tokens") for r in runs], [metric(r, DYNAMICS, "last_train_tokens") for r in runs]
    head = ["layer", f"first snapshot ({tokens[0][0]:,.0f} tokens)" if tokens[0] else "first",
            f"last snapshot ({tokens[1][0]:,.0f} tokens)" if tokens[1] else "last"]
    return table(head, rows)


def precision_table(fp32: list[dict], bf16: list[dict], experiments: pd.DataFrame) -> str:
    rows = []
    for label, runs in (("fp32", fp32), ("bf16 autocast", bf16)):
        losses = [metric(r, EVAL, "val_loss") for r in runs]
        speed = [metric(r, "reports/train.json", "tokens_per_sec") for r in runs]
        rows.append([label, *(f"{v:.4f}" for v in losses), mean_std_text(losses, 4), mean_std_text(speed, 0)])
    n = max(len(fp32), len(bf16))
    return table(["precision", *(f"seed {i + 1}" for i in range(n)), "mean ± std", "tokens/s"], rows)


def build(rows: list[dict], selection: Selection, bf16: bool) -> str:
    experiments, sentence = load_experiments(rows, selection)
    raw = {row["rev"]: row for row in rows if row.get("rev")}
    variants = experiments[experiments["params.train.precision"] == "auto"]
    summary, _ = summarize(variants)
    runs = default_runs(experiments, raw)
    if not runs:
        raise SystemExit("results_tables: no successful rope experiment among the selected ones")
    n_layers = int(float(experiments["params.model.n_layers"].iloc[0]))
    n_heads = int(float(experiments["params.model.n_heads"].iloc[0]))
    parts = [f"<!-- {sentence} -->\n", "### Variants\n", markdown_table(summary),
             "\n### Variants: parameters, 95% intervals and paired differences\n",
             variants_table(variants),
             f"\n### Interventions (rope, {len(runs)} seeds)\n", interventions_table(runs),
             f"\n### Head importance: val loss increase when the head is mean-ablated (rope, {len(runs)} seeds)\n",
             head_table(runs, n_layers, n_heads),
             "\n### Head importance within each run: 95% bootstrap intervals over the validation windows\n",
             head_intervals_table(runs, n_layers, n_heads),
             f"\n### Attention across training: mean normalized support (rope, {len(runs)} seeds)\n",
             dynamics_table(runs, n_layers)]
    if bf16:
        parts += ["\n### fp32 and bf16 autocast (rope)\n",
                  precision_table(runs, default_runs(experiments, raw, "bf16"), experiments)]
    return "".join(parts)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnlab.report.compare.results_tables",
                                     description=__doc__.split("\n\n")[0])
    add_selection_arguments(parser)
    parser.add_argument("--out", default="reports/results_tables.md")
    args = parser.parse_args(argv)
    selection = selection_of(args)
    bf16 = any("train.precision=bf16" in spec for grid in args.grid for spec in grid)
    text = build(read_rows(args.repo, args.exp_json), selection, bf16)
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
