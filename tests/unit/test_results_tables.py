"""attnlab.report.compare.results_tables: the tables of docs/results.md from exp_show rows (mean ± std over seeds)."""

import statistics

import numpy as np
import pytest
import yaml

from attnlab.report.compare.grid import Selection
from attnlab.report.compare.render import mean_std_text
from attnlab.report.compare.render import interval_text
from attnlab.report.compare.results_tables import (build, dynamics_table, head_intervals_table, head_table,
                                                   interventions_table)
from attnlab.report.compare.stats import interval95

INTERVENTIONS = "reports/interventions.json"


def run(seed: int) -> dict:
    """An exp_show row as DVC flattens the metrics files: `file:key` where a key is ambiguous, else `key`."""
    base = 3.0 + 0.01 * seed
    row = {f"{INTERVENTIONS}:baseline.loss": base, "uniform_all.loss": base + 1.0, "top_k.1.loss": base + 0.3,
           "first_train_tokens": 1000, "last_train_tokens": 10000}
    for layer in range(2):
        row[f"uniform_layer.{layer}.loss"] = base + 0.2 * (layer + 1)
        row[f"normalized_support_by_layer.L{layer}.first"] = 0.9 - 0.1 * layer
        row[f"normalized_support_by_layer.L{layer}.last"] = 0.3 + 0.01 * seed
        for head in range(2):
            row[f"mean_ablate.L{layer}H{head}.delta"] = 0.1 * (layer + 1) + 0.01 * head * seed
    return row


def test_mean_std_over_seeds_and_a_single_seed_without_error_bar():
    assert mean_std_text([1.0, 2.0, 3.0]) == f"2.000 \u00b1 {statistics.stdev([1.0, 2.0, 3.0]):.3f}"
    assert mean_std_text([1.23456]) == "1.235" and mean_std_text([]) == "\u2014"
    assert mean_std_text([1.0, float("nan"), 3.0], 1) == "2.0 \u00b1 1.4"  # a seed without the metric is left out


def test_interventions_are_losses_and_changes_against_each_seeds_own_baseline():
    lines = interventions_table([run(1), run(2), run(3)]).splitlines()
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    half = 4.303 * 0.01 / 3 ** 0.5  # t(0.975, 2) * std / sqrt(3), std of 3.01, 3.02, 3.03
    assert cells["unchanged model"] == [f"3.02 \u00b1 {half:.2f}", " |"]
    assert cells["uniform attention, every layer"][1] == "+1.0000 \u00b1 0.0000 |"  # +1.0 on every seed
    assert cells["hard top-1 (each query attends to its highest-scoring key)"][1] == "+0.3000 \u00b1 0.0000 |"
    assert cells["temperature 2 (flatter)"] == ["\u2014", "\u2014 |"]  # not in these rows


def test_head_importance_and_dynamics_per_layer():
    runs = [run(1), run(2), run(3)]
    heads = head_table(runs, n_layers=2, n_heads=2).splitlines()
    assert heads[0] == "|  | mean over its heads | most important head | least important head |"
    # layer 1: heads 0.2 and 0.2 + 0.01 * seed -> mean 0.2 + 0.005 * seed, largest 0.2 + 0.01 * seed, smallest 0.2
    assert heads[3] == "| layer 1 | 0.210 \u00b1 0.005 | 0.220 \u00b1 0.010 | 0.200 \u00b1 0.000 |"
    dynamics = dynamics_table(runs, n_layers=2).splitlines()
    assert dynamics[0] == "| layer | first snapshot (1,000 tokens) | last snapshot (10,000 tokens) |"
    assert dynamics[2] == "| layer 0 | 0.900 \u00b1 0.000 | 0.320 \u00b1 0.010 |"


PARAMS = {"seed": 1, "model": {"pe": "rope", "qkv_nonlinear_heads": [], "n_layers": 2, "n_heads": 2},
          "train": {"precision": "auto"}}


def experiment(rev: str, pe: str, precision: str, seed: int, val_loss: float, tokens_per_sec: float) -> dict:
    """An exp_show row of one finished experiment (params as exp_show reports them: numbers as floats)."""
    return {"rev": rev, "typ": "branch_commit", "Experiment": f"exp-{rev}", "Created": "", "State": "Success",
            "seed": float(seed), "model.pe": pe, "model.qkv_nonlinear_heads": "[]", "model.n_layers": 2.0,
            "model.n_heads": 2.0, "train.precision": precision, "reports/eval.json:val_loss": val_loss,
            "tokens_per_sec": tokens_per_sec, **run(seed)}


def test_build_puts_bf16_runs_in_their_own_table_not_among_the_variants(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    fp32 = {1: (3.1, 1000.0), 2: (3.3, 1100.0)}
    bf16 = {1: (3.2, 1500.0), 2: (3.6, 1700.0)}
    rows = [{"rev": "workspace", "typ": "baseline"}, experiment("l1", "learned", "auto", 1, 3.9, 900.0)]
    rows += [experiment(f"f{s}", "rope", "auto", s, *v) for s, v in fp32.items()]
    rows += [experiment(f"b{s}", "rope", "bf16", s, *v) for s, v in bf16.items()]
    grids = [["model.pe=rope,learned", "seed=1,2"], ["train.precision=bf16", "seed=1,2"]]
    text = build(rows, Selection(tmp_path / "params.yaml", [], grids), bf16=True)
    variants = text[text.index("### Variants") : text.index("### Variants: parameters")].splitlines()[3:-1]
    assert [line.split(" | ")[:2] for line in variants] == [["| rope", "2"], ["| learned", "1"]]
    assert variants[0].split(" | ")[2] == f"3.2000 \u00b1 {statistics.stdev([3.1, 3.3]):.4f}"  # fp32 seeds only
    precision = text[text.index("### fp32 and bf16") :].splitlines()
    assert precision[1] == "| precision | seed 1 | seed 2 | mean ± std | tokens/s |"
    assert precision[3] == f"| fp32 | 3.1000 | 3.3000 | 3.2000 \u00b1 {statistics.stdev([3.1, 3.3]):.4f} | 1050 \u00b1 71 |"
    assert precision[4].startswith("| bf16 autocast | 3.2000 | 3.6000 | 3.4000 \u00b1 0.2828 | 1600 \u00b1 141 |")


def test_the_95_interval_is_students_t_and_the_text_rounds_to_it():
    mean, half = interval95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert interval95([5.0])[1] != interval95([5.0])[1]  # NaN: one seed has no interval
    many = list(np.random.default_rng(0).normal(size=200))
    assert interval95(many)[1] == pytest.approx(1.96 * np.std(many, ddof=1) / 200 ** 0.5)
    assert interval_text(3.37689, 0.0134) == "3.38 \u00b1 0.01"  # two decimals for a spread of +-0.01
    assert interval_text(0.0412, 0.004, signed=True) == "+0.041 \u00b1 0.004"
    assert interval_text(3.5, float("nan")) == "3.5000"


def test_head_intervals_say_whether_the_top_and_bottom_heads_are_apart():
    r = run(1)
    for layer in range(2):
        for head in range(2):
            delta = r[f"mean_ablate.L{layer}H{head}.delta"]
            r[f"mean_ablate.L{layer}H{head}.delta_low"] = delta - 0.002
            r[f"mean_ablate.L{layer}H{head}.delta_high"] = delta + 0.002
    lines = head_intervals_table([r], n_layers=2, n_heads=2).splitlines()
    assert lines[2] == "| 1 | layer 0 | H1 +0.110 [+0.108, +0.112] | H0 +0.100 [+0.098, +0.102] | yes |"
    r["mean_ablate.L0H1.delta_low"], r["mean_ablate.L0H1.delta_high"] = 0.09, 0.13  # wide: overlaps head 0's
    assert head_intervals_table([r], 2, 2).splitlines()[2].endswith("| no |")


def test_variants_are_paired_against_rope_by_seed_and_lengths_within_each_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    rows = [{"rev": "workspace", "typ": "baseline"}]
    for seed, (rope, alibi) in {1: (3.10, 3.15), 2: (3.30, 3.36), 3: (3.20, 3.24)}.items():
        for pe, loss in (("rope", rope), ("alibi", alibi)):
            row = experiment(f"{pe}{seed}", pe, "auto", seed, loss, 1000.0)
            row.update({"val_loss_at_1x_seq_len": loss, "val_loss_at_2x_seq_len": loss - 0.05,
                        "val_loss_at_4x_seq_len": loss + 0.1 * seed, "n_params": 1234.0 if pe == "rope" else 1200.0})
            rows.append(row)
    text = build(rows, Selection(tmp_path / "params.yaml", [], [["model.pe=rope,alibi", "seed=1,2,3"]]), bf16=False)
    part = text[text.index("### Variants: parameters") : text.index("### Interventions")].splitlines()
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in part[3:] if line.startswith("|")}
    assert cells["rope"][0] == "1,234" and cells["alibi"][0] == "1,200" and cells["rope"][1] == "3"
    diffs = [0.05, 0.06, 0.04]  # alibi - rope per seed: an interval that leaves 0 out although the bands overlap
    assert cells["alibi"][3] == interval_text(*interval95(diffs), signed=True) and cells["rope"][3] == ""
    assert cells["rope"][4] == "-0.0500 \u00b1 0.0000"  # 2x - 1x on every seed
    assert cells["rope"][5] == interval_text(*interval95([0.1, 0.2, 0.3]), signed=True)
