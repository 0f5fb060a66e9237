"""attnlab.report.compare against a real tiny DVC repository built here: DVC queues and runs a real grid
(`dvc exp run --queue -S 'x=1,2' -S 'seed=1,2'`, then `--run-all`), the renderer reads dvc.api.exp_show().
tests/unit/test_experiment_comparison.py holds the tests that need no DVC run.

The toy repo has one stage, a few lines of Python writing our three metrics files from params.yaml, so every
experiment's metrics are known in closed form. Besides the grid's four experiments the queue holds two that
the page must not count: one without the profile (other params) and one duplicate of a grid point.
"""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.core.errors import ConfigError
from attnlab.report.compare.experiments import read_rows
from attnlab.report.compare.grid import Selection
from attnlab.report.compare.render import render

# One worker builds the toy repository (a module fixture) and runs every test of this file on it.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("compare")]

METRICS_SCRIPT = """\
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
x, seed = p["x"], p["seed"]
loss = x + seed ** 2 / 10
out = pathlib.Path("reports")
out.mkdir(exist_ok=True)
(out / "eval.json").write_text(json.dumps({"val_loss": loss, "val_bpb": loss / 2, "n_params": 100 * x}))
(out / "train.json").write_text(json.dumps({"val_loss": -1.0, "n_params": -1, "tokens_per_sec": 1000.0 + 10 * x + seed}))
(out / "attention.json").write_text(json.dumps({"val": {"mean_entropy_bits": 3.0 * seed + x}}))
"""

PARAMS = """\
seed: 1
x: 1
model:
  pe: rope
  qkv_nonlinear_heads: []
attention:
  seq_len_filter: [16]
unused: {}
"""

DVC_YAML = """\
stages:
  metrics:
    cmd: python metrics.py
    deps: [metrics.py]
    params: [seed, x]
    metrics:
      - reports/eval.json: {cache: false}
      - reports/train.json: {cache: false}
      - reports/attention.json: {cache: false}
"""

PROFILE = ["attention.seq_len_filter=[32,64]"]  # as the quick profile: every grid point is queued with it
GRID = ["x=1,2", "seed=1,2"]


def expected(x: int, seed: int) -> dict:
    """What the toy stage writes for (x, seed): the metrics the page reads."""
    loss = x + seed**2 / 10
    return {"val_loss": loss, "val_bpb": loss / 2, "n_params": 100 * x, "tokens_per_sec": 1000.0 + 10 * x + seed,
            "mean_entropy_bits": 3.0 * seed + x}


# DVC's queue starts its workers as `dvc` from PATH: this interpreter's dvc must come first there.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
       "DVC_NO_ANALYTICS": "1"}


def sh(repo: Path, *args: str) -> str:
    return subprocess.run(list(args), cwd=repo, check=True, capture_output=True, text=True, env=ENV,
                          timeout=600).stdout


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args)


def sets(specs: list[str]) -> list[str]:
    return [arg for spec in specs for arg in ("-S", spec)]


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("toy")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@attnlab")
    sh(repo, "git", "config", "user.name", "attnlab test")
    dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "metrics.py").write_text(METRICS_SCRIPT)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "toy")
    dvc(repo, "exp", "run", "--queue", *sets(PROFILE + GRID))  # DVC expands the grid: 4 experiments
    dvc(repo, "exp", "run", "--queue", "-S", "x=1", "-S", "seed=1")  # no profile: not in the grid
    dvc(repo, "exp", "run", "--queue", *sets(PROFILE + ["x=2", "seed=2"]))  # a duplicate of a grid point
    dvc(repo, "exp", "run", "--run-all", "-j", "2")
    rows = read_rows(repo)
    (repo / "exp_show.json").write_text(json.dumps(rows))
    return repo


def selection(repo: Path, grids=(GRID,), profile=PROFILE) -> Selection:
    return Selection(repo / "params.yaml", profile, grids)


def test_renders_the_grid_dvc_ran_with_mean_and_std_over_seeds(toy_repo, tmp_path):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    assert len([r for r in rows if r["typ"] != "baseline"]) == 6  # DVC ran all six queued experiments
    out, figure = tmp_path / "compare.html", tmp_path / "figures" / "compare_val_loss.png"
    table, summary = render(rows, selection(toy_repo), out, figure)

    assert (table["state"] == "success").all()
    assert sorted(zip(table["params.x"], table["params.seed"])) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert list(summary["params.x"]) == ["1", "2"]  # sorted by mean val_loss
    assert list(summary["n_seeds"]) == [2, 2]  # the duplicate of (x=2, seed=2) counts once
    for _, group in summary.iterrows():
        x = int(group["params.x"])
        for metric in ["val_loss", "val_bpb", "n_params", "tokens_per_sec", "mean_entropy_bits"]:
            values = [expected(x, seed)[metric] for seed in (1, 2)]
            assert group[f"{metric}_mean"] == pytest.approx(statistics.mean(values)), metric
            assert group[f"{metric}_std"] == pytest.approx(statistics.stdev(values)), metric
    assert summary.loc[0, "val_loss_std"] == pytest.approx(0.3 / math.sqrt(2))
    page = out.read_text()
    assert f"data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}" in page  # the figure, embedded
    assert "1.2500 \u00b1 0.2121" in page
    assert "1 duplicate(s) with identical params left out" in page


def test_cli_renders_a_saved_table_and_escapes_html(toy_repo, tmp_path):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    experiment = next(r for r in rows if r["typ"] != "baseline" and r["x"] == 1 and r["seed"] == 2)
    experiment["Experiment"] = "<script>alert('x')</script>&"
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(rows))
    out, figure = tmp_path / "page.html", tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.report.compare", "--exp-json", str(saved), "--params",
         str(toy_repo / "params.yaml"), *sets(PROFILE), "--grid", *GRID, "--out", str(out), "--figure", str(figure),
         "--markdown", "table.md"],
        check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("compare: 4 experiments (4 succeeded) in 2 group(s)")
    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert markdown[0] == "| variant | seeds | val_loss | val_bpb | val_loss_at_2x_seq_len | mean_entropy_bits | tokens_per_sec |"
    assert [line.split(" | ")[:2] for line in markdown[2:]] == [["| 1", "2"], ["| 2", "2"]]  # by mean val_loss
    assert markdown[2].split(" | ")[2] == "1.2500 \u00b1 0.2121"  # mean ± std over the two seeds
    page = out.read_text()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;" in page
    assert "<script>" not in page
    assert f"data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}" in page


def test_failed_experiments_are_listed_but_not_counted(toy_repo, tmp_path):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    for row in rows:  # as exp_show reports a failed run: State Failed, metrics "!"
        if row["typ"] != "baseline" and row["x"] == 1 and row["seed"] == 2:
            row.update({"State": "Failed", "val.mean_entropy_bits": "!", "tokens_per_sec": "!"})
            row.update({k: "!" for k in row if k.startswith("reports/")})
    table, summary = render(rows, selection(toy_repo), tmp_path / "c.html", tmp_path / "c.png")
    assert list(table.loc[table["params.seed"] == 2].query("`params.x` == 1")["state"]) == ["failed"]
    group = summary.set_index("params.x").loc["1"]
    assert group["n_seeds"] == 1 and group["val_loss_mean"] == pytest.approx(expected(1, 1)["val_loss"])
    assert math.isnan(group["val_loss_std"])


def test_without_grid_every_experiment_of_head_is_shown(toy_repo, tmp_path):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    table, summary = render(rows, Selection(toy_repo / "params.yaml"), tmp_path / "c.html", tmp_path / "c.png")
    assert len(table) == 5  # six experiments, one a duplicate
    assert "params.attention.seq_len_filter" in summary.columns  # the run without the profile is its own group
    assert len(summary) == 3


def test_clear_errors(toy_repo, tmp_path):
    rows = json.loads((toy_repo / "exp_show.json").read_text())
    with pytest.raises(ConfigError, match="none of the 6 experiments of HEAD is in the grid"):
        render(rows, selection(toy_repo, grids=[["x=7"]]), tmp_path / "c.html", tmp_path / "c.png")
    baselines = [r for r in rows if r["typ"] == "baseline"]
    with pytest.raises(ConfigError, match="no experiments on HEAD"):
        render(baselines, selection(toy_repo), tmp_path / "c.html", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    with pytest.raises(ConfigError, match="dvc.api.exp_show: failed"):
        read_rows(tmp_path)  # not a DVC repository
