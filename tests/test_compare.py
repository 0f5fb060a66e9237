"""attnlab.compare against the real `dvc exp show --json` of a toy DVC repository built here.

The toy repo has one stage, a few lines of Python writing our three metrics files from params.yaml, so
the expected metrics of every experiment are known in closed form. Three experiments run for real.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.compare import (
    VARIANTS,
    experiments_table,
    grid_variants,
    overrides_dict,
    queue_variants,
    read_exp_show,
    render,
    varied_params,
    variant_plan,
    variant_summary,
)
from attnlab.config import ConfigError

pytestmark = pytest.mark.slow

METRICS_SCRIPT = """\
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
loss = len(p["model"]["pe"]) + p["seed"] / 10
out = pathlib.Path("reports")
out.mkdir(exist_ok=True)
(out / "eval.json").write_text(json.dumps({"val_loss": loss, "val_bpb": loss / 2, "val_ppl": 1.0, "n_params": 100}))
(out / "train.json").write_text(json.dumps({"tokens_per_sec": 1000.0 + p["seed"], "device": "cpu"}))
(out / "attention.json").write_text(json.dumps({"val": {"mean_entropy_bits": 3.0 * p["seed"]}}))
"""

DVC_YAML = """\
stages:
  metrics:
    cmd: python metrics.py
    deps: [metrics.py]
    params: [seed, model]
    metrics:
      - reports/eval.json: {cache: false}
      - reports/train.json: {cache: false}
      - reports/attention.json: {cache: false}
"""


def expected_loss(pe: str, seed: int) -> float:
    return len(pe) + seed / 10


def sh(repo: Path, *args: str) -> str:
    return subprocess.run(list(args), cwd=repo, check=True, capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args)


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("toy")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@attnlab")
    sh(repo, "git", "config", "user.name", "attnlab test")
    dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text("seed: 1\nmodel:\n  pe: rope\n  qkv_nonlinear_heads: []\n")
    (repo / "metrics.py").write_text(METRICS_SCRIPT)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "toy")
    for name, sets in [
        ("cmp-pe-none-s1", ["model.pe=none", "seed=1"]),
        ("cmp-pe-none-s2", ["model.pe=none", "seed=2"]),
        ("cmp-qkv-nonlinear-s1", ["model.pe=rope", "model.qkv_nonlinear_heads=[all]", "seed=1"]),
    ]:
        dvc(repo, "exp", "run", "-q", "-n", name, *(arg for s in sets for arg in ("-S", s)))
    (repo / "exp_show.json").write_text(dvc(repo, "exp", "show", "--json"))
    return repo


def test_parses_real_exp_show(toy_repo):
    rows = read_exp_show(toy_repo)
    table = experiments_table(rows).set_index("name")
    assert sorted(table.index) == ["cmp-pe-none-s1", "cmp-pe-none-s2", "cmp-qkv-nonlinear-s1"]
    assert (table["state"] == "success").all()
    for name, pe, seed in [("cmp-pe-none-s1", "none", 1), ("cmp-pe-none-s2", "none", 2),
                           ("cmp-qkv-nonlinear-s1", "rope", 1)]:
        row = table.loc[name]
        assert row["params.model.pe"] == pe and row["params.seed"] == str(seed)
        assert row["val_loss"] == pytest.approx(expected_loss(pe, seed))
        assert row["val_bpb"] == pytest.approx(expected_loss(pe, seed) / 2)
        assert row["n_params"] == 100
        assert row["tokens_per_sec"] == 1000 + seed
        assert row["mean_entropy_bits"] == 3.0 * seed
    assert table.loc["cmp-qkv-nonlinear-s1", "params.model.qkv_nonlinear_heads"] == "[all]"
    assert varied_params(table.reset_index()) == ["params.seed", "params.model.pe", "params.model.qkv_nonlinear_heads"]
    assert len(experiments_table(rows, prefix="cmp-pe-")) == 2


def test_summary_groups_seeds_with_mean_and_std(toy_repo):
    table = experiments_table(read_exp_show(json_path=toy_repo / "exp_show.json"))
    summary = variant_summary(table).set_index("variant")
    assert summary.loc["none []", "n_seeds"] == 2
    losses = [expected_loss("none", 1), expected_loss("none", 2)]
    assert summary.loc["none []", "val_loss_mean"] == pytest.approx(sum(losses) / 2)
    assert summary.loc["none []", "val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    assert summary.loc["rope [all]", "n_seeds"] == 1
    assert math.isnan(summary.loc["rope [all]", "val_loss_std"])


def test_failed_experiment_metrics_are_ignored(toy_repo):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    failed = copy.deepcopy(rows)
    for baseline in failed:
        for exp in baseline.get("experiments") or []:
            if exp["name"] == "cmp-pe-none-s2":  # as DVC reports a failed queued run: metrics are the baseline's
                exp["executor"] = {"state": "failed"}
                exp["revs"][0]["error"] = {"msg": "Experiment run failed", "type": ""}
    table = experiments_table(failed).set_index("name")
    assert table.loc["cmp-pe-none-s2", "state"] == "failed"
    assert math.isnan(table.loc["cmp-pe-none-s2", "val_loss"])
    assert variant_summary(table.reset_index()).set_index("variant").loc["none []", "n_seeds"] == 1


def test_cli_renders_html_and_figure(toy_repo, tmp_path):
    out, figure = tmp_path / "compare.html", tmp_path / "figures" / "compare_val_loss.png"
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.compare", "--exp-json", str(toy_repo / "exp_show.json"),
         "--out", str(out), "--figure", str(figure)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("compare: 3 experiments (3 succeeded)")
    page = out.read_text()
    assert "cmp-qkv-nonlinear-s1" in page and "&plusmn;" in page and "data:image/png;base64," in page
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_render_without_experiments_is_a_config_error(toy_repo, tmp_path):
    with pytest.raises(ConfigError, match="no experiments named nothing-"):
        render(read_exp_show(json_path=toy_repo / "exp_show.json"), tmp_path / "c.html", tmp_path / "c.png",
               prefix="nothing")


def test_plan_and_grid():
    assert [name for name, _ in VARIANTS] == ["pe-rope", "pe-rope_model_dim", "pe-sinusoidal", "pe-learned",
                                              "pe-none", "pe-complex", "qkv-nonlinear"]
    plan = variant_plan(VARIANTS, [1, 2])
    assert len(plan) == 14
    assert plan[-1] == ("cmp-qkv-nonlinear-s2", ["model.qkv_nonlinear_heads=[all]", "seed=2"])
    grid = grid_variants(["model.d_model=128,256", "train.lr=0.001,0.003"])
    assert grid[1] == ("d_model128-lr0.003", ["model.d_model=128", "train.lr=0.003"])
    assert len(grid) == 4
    assert overrides_dict(["model.pe=none", "attention.seq_len_filter=[32,64]"]) == {
        "model": {"pe": "none"}, "attention": {"seq_len_filter": [32, 64]}}


def test_queue_validates_then_queues(toy_repo):
    bad = [("cmp-bad-s1", ["model.pe=complex", "model.qkv_nonlinear_heads=[all]", "seed=1"])]
    with pytest.raises(ConfigError, match=r"model.qkv_nonlinear_parts: .*\(in experiment cmp-bad-s1\)"):
        queue_variants(bad, repo_dir=toy_repo)
    plan = variant_plan([("pe-learned", ["model.pe=learned"])], [1, 2], prefix="q")
    commands = queue_variants(plan, extra_sets=["model.pe=none"], repo_dir=toy_repo, dry_run=True)
    assert commands[1] == ["dvc", "exp", "run", "--queue", "-n", "q-pe-learned-s2",
                           "-S", "model.pe=none", "-S", "model.pe=learned", "-S", "seed=2"]
    queue_variants(plan[:1], repo_dir=toy_repo)
    try:
        status = dvc(toy_repo, "queue", "status")
        assert "q-pe-learned-s1" in status and "Queued" in status
    finally:
        dvc(toy_repo, "queue", "remove", "--queued")
