"""The position probe and the position/token variance split, their figures, and their two stages."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from attnlab.analysis.probes import (
    analyse_checkpoint,
    between_group_shares,
    position_analysis,
    position_probe_r2,
    probe_r2,
    ridge_fit,
    variance_split,
)
from attnlab.core.params import ModelConfig
from attnlab.model.checkpoint import save_model
from attnlab.model.transformer import Transformer
from attnlab.report.plots_pe import PE_FIGURES, pe_heatmap, plot_dimension_variance, plot_position_probe

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- ridge


def test_ridge_fit_matches_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    for ridge in (0.0, 3.0):
        weight, bias = ridge_fit(x, y, ridge)
        # reference: least squares on [x, 1] with the penalty on the weights only, as stacked rows
        design = np.hstack([x.numpy(), np.ones((50, 1))])
        penalty = np.hstack([np.sqrt(ridge) * np.eye(4), np.zeros((4, 1))])
        solution, *_ = np.linalg.lstsq(np.vstack([design, penalty]), np.concatenate([y.numpy(), np.zeros(4)]),
                                       rcond=None)
        assert np.allclose(weight.numpy(), solution[:4]) and np.isclose(float(bias), solution[4])


def test_probe_recovers_a_linear_signal():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(10, 32, 6, generator=g)  # (E, T, D)
    target = acts @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0]) + 4.0  # (E, T)
    assert probe_r2(acts, target, ridge=1e-6) > 0.999999


def test_position_probe_reads_position_written_into_one_dimension():
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(8, 40, 5, generator=g)
    acts[..., 3] = torch.arange(40) * 0.05 + 0.01 * torch.randn(8, 40, generator=g)
    assert position_probe_r2(acts, ridge=1e-3) > 0.99


def test_position_probe_on_noise_is_near_zero():
    acts = torch.randn(40, 32, 8, generator=torch.Generator().manual_seed(3))
    r2 = position_probe_r2(acts, ridge=1.0)
    assert -0.05 < r2 < 0.02


# ---------------------------------------------------------------------------------------- variance split


def shares_reference(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loop version: eta^2 = SS_between / SS_total, epsilon^2 = (SS_between - (k-1) MS_within) / SS_total."""
    n, d = values.shape
    eta, eps = np.zeros(d), np.zeros(d)
    labels = sorted(set(groups.tolist()))
    for col in range(d):
        column = values[:, col]
        grand = column.mean()
        ss_total = sum((v - grand) ** 2 for v in column)
        ss_between = 0.0
        for label in labels:
            members = [column[i] for i in range(n) if groups[i] == label]
            ss_between += len(members) * (sum(members) / len(members) - grand) ** 2
        ms_within = (ss_total - ss_between) / (n - len(labels))
        if ss_total > 0:
            eta[col] = ss_between / ss_total
            eps[col] = (ss_between - (len(labels) - 1) * ms_within) / ss_total
    return eta, eps


def test_variance_split_matches_loop_reference():
    rng = np.random.default_rng(4)
    E, T, D = 5, 6, 3
    tokens = rng.integers(0, 4, size=(E, T))
    acts = rng.normal(size=(E, T, D))
    acts[..., 0] += 2.0 * np.arange(T)  # dimension 0 carries position
    acts[..., 1] += 3.0 * tokens  # dimension 1 carries the token
    acts[..., 2] = 7.0  # dimension 2 is constant
    shares = variance_split(torch.from_numpy(acts), torch.from_numpy(tokens))
    positions = np.tile(np.arange(T), E)
    pos_eta, pos_eps = shares_reference(acts.reshape(E * T, D), positions)
    tok_eta, tok_eps = shares_reference(acts.reshape(E * T, D), tokens.reshape(-1))
    assert np.allclose(shares["position_share"].numpy(), pos_eta)
    assert np.allclose(shares["position_share_adjusted"].numpy(), pos_eps)
    assert np.allclose(shares["token_share"].numpy(), tok_eta)
    assert np.allclose(shares["token_share_adjusted"].numpy(), tok_eps)
    assert shares["position_share"][0] > 0.8 and shares["token_share"][1] > 0.8
    assert shares["position_share"][2] == 0 and shares["token_share"][2] == 0


def test_adjusted_shares_are_near_zero_on_noise():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4000, 4, generator=g)
    groups = torch.randint(0, 500, (4000,), generator=g)
    eta, eps = between_group_shares(values, groups)
    assert (eta > 0.08).all()  # raw eta^2 ~ (k-1)/N = 0.125 on pure noise
    assert (eps.abs() < 0.05).all()


# ---------------------------------------------------------------------------------------- on a real model


def tiny_model(pe: str = "learned") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16, pe=pe)
    cfg.validate()
    return Transformer(cfg, 50).eval()


def test_position_analysis_on_a_model():
    model = tiny_model("sinusoidal")
    tokens = np.random.default_rng(6).integers(0, 50, size=2000).astype(np.uint16)
    starts = np.arange(12) * 100
    variance, probe = position_analysis(model, tokens, starts, ridge=1.0, batch_size=5)
    assert list(probe["point"]) == ["embed", "layer 0", "layer 1"]
    assert len(variance) == 3 * 32
    # the sinusoidal table is added at the embedding output: the probe reads position there
    assert probe.loc[probe["point"] == "embed", "r2"].item() > 0.5
    model.pos_table.zero_()  # remove it: position is gone from the embedding output
    _, probe = position_analysis(model, tokens, starts, ridge=1.0, batch_size=5)
    assert probe.loc[probe["point"] == "embed", "r2"].item() < 0.05


def test_figures_draw_the_data():
    fig = pe_heatmap(24, 16)
    closed_form = [[math.sin(t / 10000 ** (d / 16)) if d % 2 == 0 else math.cos(t / 10000 ** ((d - 1) / 16))
                    for d in range(16)] for t in range(24)]  # PE[t, 2i] = sin, PE[t, 2i+1] = cos of t / base^(2i/D)
    assert np.allclose(fig.axes[0].images[0].get_array(), np.array(closed_form), atol=1e-6)
    model = tiny_model("none")
    tokens = np.random.default_rng(7).integers(0, 50, size=1000).astype(np.uint16)
    variance, probe = position_analysis(model, tokens, np.arange(6) * 100, ridge=1.0)
    fig = plot_dimension_variance(variance)
    top = fig.axes[0].images[0].get_array()
    assert top.shape == (3, 32)
    assert np.allclose(top[1], variance[variance["point"] == "layer 0"]["position_share_adjusted"])
    fig = plot_position_probe(probe)
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), probe["r2"])
    assert [name for name, _ in PE_FIGURES] == ["pe_heatmap.png", "pe_dimension_variance.png", "position_probe.png"]


# -------------------------------------------------------------------------------------------------- stages


def write_inputs(tmp_path: Path, n_examples: int) -> Path:
    model = tiny_model("sinusoidal")
    save_model(tmp_path / "models" / "model.pt", model)
    tokens = tmp_path / "data" / "tokens"
    tokens.mkdir(parents=True)
    np.random.default_rng(8).integers(0, 50, size=3000).astype(np.uint16).tofile(tokens / "val.bin")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"analysis": {"seed": 3}, "model": {"seq_len": 64, "d_model": 32},
                                      "attention": {"seq_len_filter": [4, 8]},
                                      "probe": {"n_examples": n_examples, "ridge": 1.0}}))
    return params


def run_stage(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True)


@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_stages_write_figures_and_metrics(tmp_path):
    write_inputs(tmp_path, n_examples=6)
    proc = run_stage(tmp_path, str(REPO / "stages/position_analysis.py"), "--params", "params.yaml",
                     "--model", "models/model.pt", "--tokens", "data/tokens",
                     "--variance-figure", "figs/pe_dimension_variance.png",
                     "--probe-figure", "figs/position_probe.png", "--metrics", "position_probe.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("position_analysis: 6 windows, 3 points")
    r2 = json.loads((tmp_path / "position_probe.json").read_text())["position_probe_r2"]
    _, probe = analyse_checkpoint(tmp_path / "models/model.pt", tmp_path / "data/tokens", 6, 1.0, seed=3)
    assert r2 == {point: round(value, 6) for point, value in zip(probe["point"], probe["r2"])}
    assert r2["embed"] > 0.3  # sinusoidal: position is readable at the embedding output
    for name in ("pe_dimension_variance.png", "position_probe.png"):
        assert (tmp_path / "figs" / name).read_bytes().startswith(b"\x89PNG")

    proc = run_stage(tmp_path, str(REPO / "stages/pe_heatmap.py"), "--params", "params.yaml", "--out", "h.png")
    assert proc.returncode == 0, proc.stderr
    assert "64 positions x 32 dimensions" in proc.stdout
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("n_examples, model, message", [
    (1, "models/model.pt", "error: probe.n_examples: 1: the held-out probe needs at least 2 windows"),
    (4, "models/missing.pt", "error: models/missing.pt: model file not found"),
])
@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_position_stage_bad_input_is_one_line(tmp_path, n_examples, model, message):
    write_inputs(tmp_path, n_examples=n_examples)
    proc = run_stage(tmp_path, str(REPO / "stages/position_analysis.py"), "--params", "params.yaml",
                     "--model", model, "--tokens", "data/tokens", "--variance-figure", "v.png",
                     "--probe-figure", "p.png", "--metrics", "m.json")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message)
    assert not (tmp_path / "m.json").exists()
