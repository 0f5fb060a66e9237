"""End to end on real dvc: the analysis stages after train (interventions, position analysis, PE variants)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

PNG = b"\x89PNG\r\n\x1a\n"


def stale_stages(project) -> set[str]:
    return project.stale_stages()


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG, path
    assert len(data) > min_bytes, path


def test_interventions_stage_writes_its_metrics_figures_and_samples(dvc_project):
    p = dvc_project.path
    metrics = json.loads((p / "reports/interventions.json").read_text())
    assert set(metrics) >= {"baseline", "uniform_all", "uniform_layer", "temperature", "top_k", "mean_ablate"}
    assert set(metrics["baseline"]) >= {"loss", "ppl", "mean_entropy_bits"}
    assert set(metrics["uniform_layer"]) == {"0", "1"}
    assert set(metrics["mean_ablate"]) == {f"L{layer}H{head}" for layer in range(2) for head in range(2)}
    assert metrics["temperature"]["1.0"]["loss"] == pytest.approx(metrics["baseline"]["loss"], abs=1e-5)
    assert metrics["top_k"]["64"]["loss"] == pytest.approx(metrics["baseline"]["loss"], abs=1e-5)
    for name in ("intervention_temperature", "intervention_top_k", "head_importance", "intervention_uniform"):
        assert_png(p / "reports/figures" / f"{name}.png")
    assert (p / "reports/intervention_samples.md").read_text().count("```") >= 8


def test_the_explorer_is_one_self_contained_page_rerun_by_its_own_params_only(dvc_project):
    page = (dvc_project.path / "reports/explorer.html").read_text()
    assert page.lstrip().startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert 'id="explorer-data"' in page and '<select id="head">' in page
    with dvc_project.params_changed({"explorer": {"max_tokens": 32}}):
        assert stale_stages(dvc_project) == {"explorer"}
    with dvc_project.params_changed({"interventions": {"top_k": [1, 2]}}):
        assert "explorer" not in stale_stages(dvc_project)


def test_changing_the_temperature_sweep_reruns_only_interventions_and_what_reads_it(dvc_project):
    with dvc_project.params_changed({"interventions": {"temperatures": [0.5, 1.0, 3.0]}}):
        stale = stale_stages(dvc_project)
    assert "interventions" in stale
    assert stale <= {"interventions", "report"}


def test_position_analysis_and_pe_heatmap_figures(dvc_project):
    p = dvc_project.path
    for name in ("pe_heatmap", "pe_dimension_variance", "position_probe"):
        assert_png(p / "reports/figures" / f"{name}.png")
    probe = json.loads((p / "reports/position_probe.json").read_text())
    assert probe, "the probe writes its held-out R^2 per layer"


ATTENTION_FIGURES = ("attn_weights_support", "attn_support_hist_all", "attn_support_vs_seq_len",
                     "attn_support_hist_by_block_head_w_seq_len_filter", "attn_entropy_heatmap",
                     "attn_head_diversity", "attn_mean_patterns", "attn_support_over_training")


def test_attention_stats_parquet_has_the_schema_and_bounds(dvc_project):
    import numpy as np
    import pandas as pd

    stats = pd.read_parquet(dvc_project.path / "data/attention/stats.parquet")
    expected = {"split", "example", "layer", "head", "position", "entropy_bits", "support", "normalized_support",
                "max_weight", "mean_distance", "weight_on_first"}
    assert expected <= set(stats.columns)
    assert set(stats["split"].astype(str)) == {"train", "val"}
    n_examples, layers, heads, seq_len = 4, 2, 2, 64  # TINY_PARAMS
    assert len(stats) == 2 * n_examples * layers * heads * seq_len
    assert stats["layer"].dtype.itemsize <= 2 and stats["position"].dtype.itemsize <= 2
    bound = np.log2(stats["position"].to_numpy() + 1.0)
    assert (stats["entropy_bits"] >= -1e-6).all() and (stats["entropy_bits"] <= bound + 1e-5).all()
    assert np.allclose(stats["support"], 2.0 ** stats["entropy_bits"], rtol=1e-5)
    metrics = json.loads((dvc_project.path / "reports/attention.json").read_text())
    for split in ("train", "val"):
        assert {"mean_entropy_bits", "mean_support", "mean_normalized_support"} <= set(metrics[split])


def test_attention_dynamics_follows_the_snapshots_of_training_to_the_final_model(dvc_project):
    import pandas as pd

    p = dvc_project.path
    table = pd.read_parquet(p / "data/attention/dynamics.parquet")
    steps = table.drop_duplicates("step")
    assert len(steps) >= 2 and steps["train_tokens"].is_monotonic_increasing
    assert (table.groupby("step").size() == 2 * 2).all()  # TINY_PARAMS: 2 layers x 2 heads per snapshot
    train = json.loads((p / "reports/train.json").read_text())
    assert steps["step"].iloc[-1] == train["steps"] and steps["train_tokens"].iloc[-1] == train["train_tokens"]
    metrics = json.loads((p / "reports/attention_dynamics.json").read_text())
    assert metrics["n_snapshots"] == len(steps) and metrics["last_vs_attention_stats"]["within_tolerance"]
    assert_png(p / "reports/figures/attn_support_over_training.png")


def test_every_attention_figure_and_the_token_view_exist(dvc_project):
    figures = dvc_project.path / "reports/figures"
    for name in ATTENTION_FIGURES:
        assert_png(figures / f"{name}.png")
    page = (figures / "attn_tokens.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html>") and "http://" not in page and "https://" not in page


def test_a_figure_only_param_reruns_only_that_figure(dvc_project):
    with dvc_project.params_changed({"attention": {"seq_len_filter": [8, 24]}}):
        stale = stale_stages(dvc_project)
    assert stale == {"figure_support_hist_by_head"} or stale == {"figure_support_hist_by_head", "report"}


def test_a_memory_knob_reruns_only_the_figure_whose_picture_it_sizes(dvc_project):
    """attention.batch_size bounds memory in attention_stats (its output does not depend on it) and picks how
    many examples attn_weights_support draws: only that figure reruns."""
    with dvc_project.params_changed({"attention": {"batch_size": 3}}):
        stale = stale_stages(dvc_project)
    assert stale == {"figure_weights_support"}


def test_the_analysis_seed_reruns_the_measurements_and_the_training_seed_the_model(dvc_project):
    with dvc_project.params_changed({"analysis": {"seed": 11}}):
        stale = stale_stages(dvc_project)
    assert stale == {"evaluate", "attention_stats", "attention_dynamics", "interventions", "position_analysis",
                     "head_roles"}
    with dvc_project.params_changed({"seed": 11}):
        stale = stale_stages(dvc_project)
    assert stale == {"train"}  # what follows reruns once the model changes


def test_the_report_page_is_self_contained_and_shows_every_figure(dvc_project):
    page = (dvc_project.path / "reports/index.html").read_text()
    assert page.count("data:image/png;base64,") >= 1 + len(ATTENTION_FIGURES) + 4 + 3
    assert "src=\"http" not in page and "href=\"http" not in page
    assert "not produced in this run" not in page
    for heading in ("Metrics", "Training", "Attention", "Head roles", "Interventions", "Positional encoding",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in page


def test_head_roles_stage_writes_every_heads_scores_and_the_causal_check(dvc_project):
    import pandas as pd

    p = dvc_project.path
    table = pd.read_parquet(p / "data/attention/head_roles.parquet")
    assert len(table) == 2 * 2 * 4  # TINY_PARAMS: 2 layers x 2 heads, 4 roles
    assert set(table["role"].astype(str)) == {"induction", "duplicate", "previous_token", "sink"}
    assert ((table["score"] >= 0) & (table["score"] <= 1)).all()
    metrics = json.loads((p / "reports/head_roles.json").read_text())
    assert metrics["repeated"] == {"n_sequences": 4, "half_len": 32, "seq_len": 64}  # head_roles.n_sequences: 4
    ablation = metrics["ablation"]
    assert len(ablation["heads"]) == 1 and len(ablation["control_heads"]) == 1  # head_roles.top_k: 1
    assert set(ablation["rise_second_copy"]) == {"induction_heads", "control_heads"}
    for name in ("head_roles", "induction_over_training"):
        assert_png(p / "reports/figures" / f"{name}.png")
    dynamics = pd.read_parquet(p / "data/attention/dynamics.parquet")
    assert {"induction_score", "previous_token_score", "icl_score_nats", "repeat_icl_nats", "val_loss"} <= set(dynamics)
    page = (p / "reports/index.html").read_text()
    assert 'data-topic="induction"' in page and 'data-topic="copying"' in page


def test_the_head_roles_params_rerun_what_reads_them_and_nothing_else(dvc_project):
    with dvc_project.params_changed({"head_roles": {"top_k": 2}}):
        assert stale_stages(dvc_project) == {"head_roles"}
    with dvc_project.params_changed({"head_roles": {"n_sequences": 3}}):
        assert stale_stages(dvc_project) == {"head_roles", "attention_dynamics"}


def test_alibi_runs_every_stage_that_runs_the_model_and_evaluates_past_the_trained_length(dvc_project):
    """Every stage that loads the model, on an ALiBi model; the figures and the report read only their tables."""
    targets = ("evaluate", "attention_stats", "attention_dynamics", "head_roles", "interventions",
               "position_analysis", "explorer")
    result = dvc_project.dvc("exp", "run", "--temp", "-n", "alibi-pe", "-S", "model.pe=alibi", *targets)
    for stage in ("train", *targets):
        assert f"Running stage '{stage}'" in result.stdout, stage
    table = json.loads(dvc_project.dvc("exp", "show", "--json").stdout)
    experiments = [exp for row in table for exp in (row.get("experiments") or [])]
    [ours] = [exp for exp in experiments if exp.get("name") == "alibi-pe"]
    metrics = ours["revs"][0]["data"]["metrics"]["reports/eval.json"]["data"]
    assert {"val_loss_at_2x_seq_len", "val_loss_at_4x_seq_len"} <= set(metrics)
