"""benchmarks/results_tables.py: the tables of docs/results.md from exp_show rows (mean ± std over seeds)."""

import statistics

from benchmarks.results_tables import dynamics_table, head_table, interventions_table, mean_std

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
    assert mean_std([1.0, 2.0, 3.0]) == f"2.000 \u00b1 {statistics.stdev([1.0, 2.0, 3.0]):.3f}"
    assert mean_std([1.23456]) == "1.235" and mean_std([]) == "\u2014"


def test_interventions_are_losses_and_changes_against_each_seeds_own_baseline():
    lines = interventions_table([run(1), run(2), run(3)]).splitlines()
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert cells["unchanged model"] == ["3.020 \u00b1 0.010", " |"]
    assert cells["uniform attention, every layer"][1] == "1.000 \u00b1 0.000 |"  # +1.0 on every seed
    assert cells["hard top-1 (each query attends to its highest-scoring key)"][1] == "0.300 \u00b1 0.000 |"
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
