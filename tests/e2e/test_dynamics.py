"""Attention across training (attnlab.analysis.dynamics and stages/attention_dynamics.py) on a real tiny run:
the per-head means of every snapshot are attention_stats's numbers, and the last snapshot agrees with
reports/attention.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import TINY_TRAIN_PARAMS, run_stage, write_params, write_tokens

from attnlab.analysis.dynamics import TOLERANCE, attention_dynamics, head_means
from attnlab.analysis.stats import attention_stats, stage_examples, stream_attention_stats
from attnlab.core.errors import ConfigError
from attnlab.core.params import load_params
from attnlab.model.checkpoint import load_model
from attnlab.training.loop import TrainPaths, train
from attnlab.model.snapshots import list_snapshots

N_EXAMPLES, LAYERS, HEADS = 6, 2, 2  # TINY_TRAIN_PARAMS: 2 layers x 2 heads, seq_len 32
EVAL_STEPS = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32]  # 32 steps, validation every 3 and at the last
SNAPSHOT_STEPS = [0] + EVAL_STEPS  # and one at initialization
STAGE_ARGS = ["--params", "params.yaml", "--snapshots", "run/snapshots", "--tokens", "tokens", "--reference",
              "reports/attention.json", "--out", "attention/dynamics.parquet", "--metrics", "reports/dynamics.json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run (snapshots and final model), attention_stats of its model, attention_dynamics stage."""
    root = tmp_path_factory.mktemp("dynamics")
    write_tokens(root / "tokens")
    overrides = json.loads(json.dumps(TINY_TRAIN_PARAMS))
    overrides["train"]["device"] = "cpu"
    overrides["attention"].update(n_examples=N_EXAMPLES, batch_size=4)
    overrides["head_roles"] = {"n_sequences": 8}
    params = load_params(write_params(root / "params.yaml", overrides))
    out = root / "run"
    train(params, TrainPaths.under(out, root / "tokens"))
    stats = attention_stats(params, out / "model.pt", root / "tokens", root / "attention")
    (root / "reports").mkdir()
    (root / "reports" / "attention.json").write_text(json.dumps(stats["metrics"]))
    result = run_stage("attention_dynamics.py", *STAGE_ARGS, cwd=root)
    assert result.returncode == 0, result.stderr
    (root / "stage_stdout.txt").write_text(result.stdout)
    return root


def test_one_row_per_snapshot_layer_and_head_on_the_val_examples(run):
    table = pd.read_parquet(run / "attention" / "dynamics.parquet")
    assert {"train_tokens", "step", "split", "layer", "head", "mean_entropy_bits", "mean_support",
            "mean_normalized_support"} <= set(table.columns)
    assert table["train_tokens"].dtype == np.int64 and set(table["split"].astype(str)) == {"val"}
    assert len(table) == len(SNAPSHOT_STEPS) * LAYERS * HEADS
    for step, part in table.groupby("step"):
        assert sorted(zip(part["layer"], part["head"])) == [(l, h) for l in range(LAYERS) for h in range(HEADS)]
    steps = table.drop_duplicates("step")
    assert steps["step"].tolist() == SNAPSHOT_STEPS
    assert steps["train_tokens"].tolist() == [s * 8 * 32 for s in SNAPSHOT_STEPS]  # done * tokens_per_step
    assert ((table["mean_normalized_support"] > 0) & (table["mean_normalized_support"] <= 1)).all()
    bits = np.log2(table["mean_support"])  # support = 2^entropy per row, so mean support >= 2^mean entropy
    assert (bits >= table["mean_entropy_bits"] - 1e-9).all()
    line = (run / "stage_stdout.txt").read_text().strip().splitlines()[-1]
    assert line.startswith(f"attention_dynamics: {len(SNAPSHOT_STEPS)} snapshots (0 to 8,192 tokens)")


def test_the_last_snapshot_agrees_with_attention_json(run):
    reference = json.loads((run / "reports" / "attention.json").read_text())["val"]
    table = pd.read_parquet(run / "attention" / "dynamics.parquet")
    last = table[table["step"] == EVAL_STEPS[-1]]
    assert last["mean_entropy_bits"].mean() == pytest.approx(reference["mean_entropy_bits"],
                                                             abs=TOLERANCE["entropy_bits"])
    for row in last.itertuples():
        want = reference["heads"][f"L{row.layer}H{row.head}"]["mean_normalized_support"]
        assert row.mean_normalized_support == pytest.approx(want, abs=TOLERANCE["normalized_support"])
    metrics = json.loads((run / "reports" / "dynamics.json").read_text())
    assert metrics["n_snapshots"] == len(SNAPSHOT_STEPS)
    assert (metrics["first_train_tokens"], metrics["last_train_tokens"]) == (0, 32 * 256)
    check = metrics["last_vs_attention_stats"]
    assert check["within_tolerance"] and check["max_abs_diff_entropy_bits"] <= TOLERANCE["entropy_bits"]
    first = table[table["step"] == 0]  # the untrained model
    assert not np.allclose(first["mean_normalized_support"], last["mean_normalized_support"])  # it did change
    for layer in (0, 1):  # the per-layer summary: the mean over the layer's heads at the first and last snapshot
        by_layer = metrics["normalized_support_by_layer"][f"L{layer}"]
        assert by_layer["first"] == pytest.approx(first.loc[first["layer"] == layer, "mean_normalized_support"].mean())
        assert by_layer["last"] == pytest.approx(last.loc[last["layer"] == layer, "mean_normalized_support"].mean())
    assert metrics["first"]["mean_entropy_bits"] == pytest.approx(first["mean_entropy_bits"].mean())


def test_head_means_are_the_numbers_of_stats_py(run):
    """The same model and examples through head_means and through attention_stats's stream and parquet rows."""
    params = load_params(run / "params.yaml")
    model, _ = load_model(run / "run" / "model.pt")
    examples = stage_examples(params, run / "tokens", model, splits=("val",))[1]["val"]
    tables = []
    summary = stream_attention_stats(model, {"val": examples}, 4, tables.append)
    means = head_means(model, examples, 4)
    rows = pd.concat([t.to_pandas() for t in tables]).groupby(["layer", "head"])["entropy_bits"].mean()
    stored = pd.read_parquet(run / "attention" / "stats.parquet")
    stored = stored[stored["split"] == "val"].groupby(["layer", "head"])["entropy_bits"].mean()
    for layer in range(LAYERS):
        for head in range(HEADS):
            want = summary.metrics["val"]["heads"][f"L{layer}H{head}"]
            for name in ("mean_support", "mean_normalized_support"):
                assert means[name][layer, head] == pytest.approx(want[name], rel=1e-12)
            assert means["mean_entropy_bits"][layer, head] == pytest.approx(rows[(layer, head)], abs=1e-5)
            assert means["mean_entropy_bits"][layer, head] == pytest.approx(stored[(layer, head)], abs=1e-5)
    assert means["mean_entropy_bits"].mean() == pytest.approx(summary.metrics["val"]["mean_entropy_bits"], rel=1e-9)


def test_an_empty_or_missing_snapshot_folder_is_a_config_error_naming_it(run, tmp_path):
    params = load_params(run / "params.yaml")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError) as err:
            attention_dynamics(params, folder, run / "tokens", tmp_path / "out.parquet")
        assert err.value.key == str(folder)
    result = run_stage("attention_dynamics.py", *STAGE_ARGS[:2], "--snapshots", str(tmp_path / "empty"),
                       *STAGE_ARGS[4:], cwd=run)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty'}: no weight snapshots (step_*.pt) here: the " \
        "train stage writes one at initialization and every validation point (dvc repro train)"
    assert list_snapshots(run / "run" / "snapshots")  # the run's own are untouched


def test_each_snapshot_holds_the_head_roles_and_the_last_agrees_with_the_head_roles_stage(run, tmp_path):
    from attnlab.analysis.head_roles import ROLES, head_roles

    table = pd.read_parquet(run / "attention" / "dynamics.parquet")
    for name in ("val_loss", "icl_score_nats", "repeat_icl_nats"):  # one value per snapshot
        assert (table.groupby("step")[name].nunique() == 1).all(), name
    params = load_params(run / "params.yaml")
    final = head_roles(params, run / "run" / "model.pt", run / "tokens", tmp_path / "head_roles.parquet")
    last = table[table["step"] == EVAL_STEPS[-1]].set_index(["layer", "head"])
    for row in final["table"].itertuples():  # float16 weights against float32: close, not equal
        assert last.loc[(row.layer, row.head), f"{row.role}_score"] == pytest.approx(row.score, abs=0.01), row
    assert last["repeat_icl_nats"].iloc[0] == pytest.approx(final["metrics"]["icl"]["repeat_icl_nats"], abs=0.02)
    assert last["val_loss"].iloc[0] == pytest.approx(final["metrics"]["icl"]["val_loss"], abs=0.01)
    assert {f"{role}_score" for role in ROLES} <= set(table.columns)


def test_the_largest_induction_rise_is_the_biggest_step_between_snapshots(run):
    table = pd.read_parquet(run / "attention" / "dynamics.parquet")
    roles = json.loads((run / "reports" / "dynamics.json").read_text())["roles"]
    induction = roles["induction"]
    last = table[table["step"] == EVAL_STEPS[-1]]
    best = last.loc[last["induction_score"].idxmax()]
    assert induction["strongest_head"] == f"L{best['layer']}H{best['head']}"
    scores = table[(table["layer"] == best["layer"]) & (table["head"] == best["head"])].sort_values("step")
    values, steps = scores["induction_score"].tolist(), scores["step"].tolist()
    rises = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]  # by hand, a loop over the snapshots
    _, i = max(rises)
    rise = induction["largest_rise"]
    assert (rise["from_step"], rise["to_step"]) == (steps[i], steps[i + 1])
    assert (rise["from_score"], rise["to_score"]) == (pytest.approx(values[i]), pytest.approx(values[i + 1]))
    assert rise["to_train_tokens"] == rise["to_step"] * 8 * 32
    first = table[table["step"] == 0]
    assert roles["val_loss"] == {"first": pytest.approx(first["val_loss"].iloc[0]),
                                 "last": pytest.approx(last["val_loss"].iloc[0])}
    assert roles["val_loss"]["last"] < roles["val_loss"]["first"]  # the run learned
