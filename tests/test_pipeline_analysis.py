"""End to end on real dvc: the analysis stages after train (interventions, position analysis, PE variants)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

PNG = b"\x89PNG\r\n\x1a\n"


def stale_stages(project) -> set[str]:
    return set(json.loads(project.dvc("status", "--json").stdout or "{}"))


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


def test_a_non_default_pe_variant_runs_end_to_end_as_an_experiment(dvc_project):
    result = dvc_project.dvc("exp", "run", "--temp", "-n", "complex-pe", "-S", "model.pe=complex")
    assert "Running stage 'train'" in result.stdout
    assert "Stage 'tokenize' didn't change, skipping" in result.stdout
    table = json.loads(dvc_project.dvc("exp", "show", "--json").stdout)
    names = [exp.get("name") for row in table for exp in (row.get("experiments") or [])]
    assert "complex-pe" in names
