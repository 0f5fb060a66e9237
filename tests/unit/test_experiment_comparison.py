"""attnlab.report.compare without DVC runs: DVC's -S grammar (hand-worked cases, and DVC's own reading of the same
specs as the reference), the statistics over seeds, the markdown table, the figure, and the Makefile's commands."""

from __future__ import annotations

import math
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from attnlab.core.errors import ConfigError
from attnlab.report.compare.cli import build_parser
from attnlab.report.compare.experiments import METRICS, number
from attnlab.report.compare.grid import Override, Selection, cell, grid_values, parse_override
from attnlab.report.compare.render import MARKDOWN_METRICS, format_mean_std, markdown_table, plot
from attnlab.report.compare.stats import mean_std, summarize

ROOT = Path(__file__).resolve().parents[2]
while not (ROOT / "Makefile").exists() and ROOT != ROOT.parent:  # tests/ or tests/unit/
    ROOT = ROOT.parent

PARAMS = """\
seed: 1
x: 1
name: a
model:
  pe: rope
  qkv_nonlinear_heads: []
  d: {a: 1, b: 2}
attention:
  seq_len_filter: [16]
unused: {}
"""

# ------------------------------------------------------------------------------------------ DVC's -S grammar


def values(spec: str) -> list:
    return list(parse_override(spec).values)


def test_a_comma_list_is_a_sweep_with_hydras_types():
    assert parse_override("model.pe=rope,none") == Override("model.pe", ("rope", "none"))
    assert values("seed=1,2,3") == [1, 2, 3] and all(type(v) is int for v in values("seed=1,2,3"))
    assert values("x=0.5, 1e-3 ,.5,1.,inf") == [0.5, 0.001, 0.5, 1.0, math.inf]
    assert values("x=true,False,null,NULL") == [True, False, None, None]
    assert values("x=1_000,01,1__0,-,a b") == [1000, "01", "1__0", "-", "a b"]  # 01: not an int, as in Hydra
    assert values("x=") == [""] and values("x=  padded  ") == ["padded"]


def test_brackets_hold_one_list_value_and_braces_one_mapping():
    assert values("model.qkv_nonlinear_heads=[all]") == [["all"]]
    assert values("attention.seq_len_filter=[ 32 , 64 ]") == [[32, 64]]
    assert values("x=[]") == [[]] and values("x=[[1,2],[3]]") == [[[1, 2], [3]]]
    assert values("x=[1,2],[3]") == [[1, 2], [3]]  # a sweep over two lists
    assert values("x={a: 1, b: [2]}") == [{"a": 1, "b": [2]}]


def test_quotes_and_backslashes():
    assert values("x='a,b'") == ["a,b"] and values('x="a b",c') == ["a b", "c"]
    assert values("x='1'") == ["1"]  # quoted: a string, never a number
    assert values("x=[a,'b,c']") == [["a", "b,c"]]
    assert values("x='it\\'s'") == ["it's"] and values('x="a\'b"') == ["a'b"]
    assert values("x='a\\\\'") == ["a\\"]  # an even run of backslashes before the closing quote: half of them
    assert values("x='a\\b'") == ["a\\b"]  # elsewhere a backslash stays
    assert values("x=a\\,b") == ["a,b"] and values("x=a\\ ") == ["a "] and values("x=\\1") == ["\\1"]
    assert values("x=\\1,2") == ["\\1", 2]


def test_range_choice_and_deletion():
    assert values("seed=range(1,4)") == [1, 2, 3] and values("seed=range(3)") == [0, 1, 2]
    assert values("x=range(5, 1, -2)") == [5, 3]
    assert values("x=range(0,0.3,0.1)") == [0.0, 0.1, 0.2]  # not 0.30000000000000004 < 0.3: added exactly
    assert values("x=choice(a, [1], 'b,c')") == ["a", [1], "b,c"]
    assert parse_override("~seed") == Override("seed", delete=True) == parse_override("~seed=1")
    assert parse_override("+new=1") == parse_override("++new=1") == Override("new", (1,))


REJECTED = [  # (spec, the reason given); DVC rejects each of them too
    ("x=range(1", "expected ')'"), ("x=(", "'(' at character 3 needs quotes or a backslash"), ("x=a,", "a value is missing"),
    ("x=,a", "a value is missing"), ("x=a=b", "'=' at character 4"), ("x=café", "'é'"), ("x='a", "never closed"),
    ("x='a'b", "after the quoted string"), ("x=[1,2", "expected ']'"), ("x=range(1,2,3,4)", "1 to 3 numbers"),
    ("x=range(a)", "takes numbers"), ("x", "expected key=value"), ("a b=1", "not a param key"),
    ("x=it\\'s", "\"'\" at character 6 needs quotes"),
]  # fmt: skip
UNSUPPORTED = [  # DVC takes them, this grammar does not: an error rather than a guess
    ("x=sort(2,1)", "sort() is not supported"), ("x=${y}", "interpolations"), ("x=choice(a),b", "unexpected ','"),
]


@pytest.mark.parametrize("spec, reason", REJECTED + UNSUPPORTED, ids=[spec for spec, _ in REJECTED + UNSUPPORTED])
def test_specs_outside_the_grammar_are_errors_naming_the_spec(spec, reason):
    with pytest.raises(ConfigError, match=f"cannot parse {re.escape(spec)} as DVC's -S syntax: .*{re.escape(reason)}"):
        parse_override(spec)


@pytest.mark.parametrize("spec", [spec for spec, _ in REJECTED])
def test_dvc_rejects_the_specs_rejected_here(spec):
    hydra = pytest.importorskip("dvc.utils.hydra")
    with pytest.raises(Exception):  # noqa: B017 - Hydra's parse error (an OverrideParseException)
        hydra.get_hydra_sweeps({"params.yaml": [spec]})


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


GRIDS = [
    ["x=1,2", "seed=range(1,4)"], ["model.qkv_nonlinear_heads=[all]", "attention.seq_len_filter=[32, 64]"],
    ["model.pe=choice(none,learned)", "seed=1,2", "model.pe=rope"], ["name='a,b',\"c d\",a\\,b", "x=0.5,1e3"],
    ["x=range(0,0.3,0.1)", "seed=range(5,1,-2)"], ["name=null,true,01,1_000,'1'"], ["model.d={a: 5}"],
    ["~model.d", "+new=[1,[2]]"], ["name='it\\'s',\"a'b\""], ["x=range(0.1,0.7,0.1)"],
]  # fmt: skip


@pytest.mark.parametrize("grid", GRIDS, ids=" ".join)
def test_grid_values_agree_with_the_params_dvc_writes_for_each_experiment_it_queues(grid, tmp_path):
    """The reference is DVC itself: the experiments `dvc exp run --queue -S ...` expands the grid into, each
    with the params file DVC writes for it; every key takes exactly the values grid_values allows."""
    hydra = pytest.importorskip("dvc.utils.hydra")
    base = yaml.safe_load(PARAMS)
    written: dict[str, list] = {}
    for i, experiment in enumerate(hydra.get_hydra_sweeps({"params.yaml": grid})):
        path = tmp_path / f"params{i}.yaml"
        path.write_text(PARAMS)
        hydra.apply_overrides(str(path), experiment["params.yaml"])
        for key, value in flat(yaml.safe_load(path.read_text())).items():
            written.setdefault(key, []).append(cell(value))
    allowed = grid_values(flat(base), grid)
    assert set(allowed) == set(written)
    for key, seen in written.items():
        assert set(map(repr, seen)) == set(map(repr, allowed[key])), key


def test_grid_values_later_specs_win_and_deletions_remove_the_key():
    base = {"seed": 1, "model.pe": "rope", "attention.seq_len_filter": [16], "train.lr": 0.001}
    allowed = grid_values(base, ["model.pe=rope,none", "seed=range(1,4)", "attention.seq_len_filter=[32,64]",
                                 "train.lr=0.003", "train.lr=choice(0.01,0.1)"])
    assert allowed == {"seed": [1.0, 2.0, 3.0], "model.pe": ["rope", "none"],
                       "attention.seq_len_filter": ["[32, 64]"], "train.lr": [0.01, 0.1]}
    assert grid_values(base, ["model.qkv_nonlinear_heads=[all]"])["model.qkv_nonlinear_heads"] == ["['all']"]
    assert "seed" not in grid_values(base, ["~seed"])
    with pytest.raises(ConfigError, match="a sweep over mappings"):
        grid_values(base, ["model={a: 1},{a: 2}"])


def test_bad_specs_and_params_fail_before_dvc_is_asked(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    with pytest.raises(ConfigError, match="cannot parse x=range"):
        Selection(tmp_path / "params.yaml", [], [["x=range(1"]])
    with pytest.raises(ConfigError, match="params file not found"):
        Selection(tmp_path / "missing.yaml")
    proc = subprocess.run([sys.executable, "-m", "attnlab.report.compare", "--repo", str(tmp_path), "--grid", "x=("],
                          check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --grid/-S: cannot parse x=(")


def test_make_renders_exactly_the_grids_it_queues():
    """`make -n compare` / `make -n sweep`: the renderer gets the same -S specs as each `dvc exp run --queue`."""
    for target, extra in [("compare", []), ("sweep", ["SWEEP=-S model.d_model=64,128 -S train.lr=0.001,0.003"])]:
        proc = subprocess.run(["make", "-n", target, "QUICK=1", "COMPARE_SEEDS=1,2", *extra], cwd=ROOT,
                              check=False, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        lines = [shlex.split(line) for line in proc.stdout.replace("\\\n", " ").splitlines()]
        queued = [words[4:] for words in lines if words[:4] == ["dvc", "exp", "run", "--queue"]]
        assert any(" dvc exp run --run-all " in f" {' '.join(words)} " for words in lines)
        render_args = next(words[3:] for words in lines if words[1:3] == ["-m", "attnlab.report.compare"])
        args = build_parser().parse_args(render_args)
        assert [args.sets + grid for grid in args.grid] == [specs[1::2] for specs in queued]
        assert all(specs[::2] == ["-S"] * (len(specs) // 2) for specs in queued)
        if target == "compare":
            pe_grid = "model.pe=rope,rope_model_dim,sinusoidal,learned,none,complex,alibi"
            assert [grid[0] for grid in args.grid] == [pe_grid, "model.qkv_nonlinear_heads=[all]"]
        assert all(grid[-1] == "seed=1,2" for grid in args.grid)


def test_make_results_runs_the_tables_module_on_the_compare_grids():
    proc = subprocess.run(["make", "-n", "results", "COMPARE_SEEDS=1,2"], cwd=ROOT, check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.replace("\\\n", " ").splitlines()]
    (tables,) = [words for words in lines if words[1:3] == ["-m", "attnlab.report.compare.results_tables"]]
    grids = [tables[i + 1 : i + 3] for i, word in enumerate(tables) if word == "--grid"]
    assert grids == [["model.pe=rope,rope_model_dim,sinusoidal,learned,none,complex,alibi", "seed=1,2"],
                     ["model.qkv_nonlinear_heads=[all]", "seed=1,2"]]


# ---------------------------------------------------------------------------------------- statistics, output


def test_number_and_mean_std_against_statistics():
    assert [number(v) for v in (3, 2.5, np.float32(0.5))] == [3.0, 2.5, 0.5]
    assert all(math.isnan(number(v)) for v in ("!", None, True, "3"))
    values = [3.1, 2.9, 3.4, math.nan]
    assert mean_std(values) == (statistics.mean(values[:3]), statistics.stdev(values[:3]))
    assert mean_std([2.0])[0] == 2.0 and math.isnan(mean_std([2.0])[1])
    assert all(math.isnan(v) for v in mean_std([math.nan, "!"]))


def test_format_mean_std():
    assert format_mean_std(1.23456, 0.01, 4) == "1.2346 \u00b1 0.0100"
    assert format_mean_std(12345.6, 789.4, 0, thousands=True) == "12,346 \u00b1 789"
    assert format_mean_std(1.5, math.nan, 3) == "1.500" and format_mean_std(math.nan, 0.1, 3) == "\u2014"


def seeded_table(pe_to_2x: dict[str, float]) -> pd.DataFrame:
    rows = []
    for pe, at_2x in pe_to_2x.items():
        for seed in (1, 2):
            row = {"name": f"{pe}-{seed}", "rev": "abc", "created": "", "state": "success",
                   "params.model.pe": pe, "params.seed": seed}
            row.update({m: 1.0 for m in METRICS})
            row.update(val_loss=3.0 + 0.1 * seed, val_loss_at_2x_seq_len=at_2x + 0.2 * seed)
            rows.append(row)
    return pd.DataFrame(rows)


def test_summary_groups_by_the_varied_params_but_the_seed():
    table = seeded_table({"rope": 3.5, "learned": math.nan})
    summary, keys = summarize(table)
    assert keys == ["params.model.pe"] and list(summary["n_seeds"]) == [2, 2]
    rope = summary.set_index("variant").loc["rope"]
    assert rope["val_loss_mean"] == pytest.approx(statistics.mean([3.1, 3.2]))
    assert rope["val_loss_std"] == pytest.approx(statistics.stdev([3.1, 3.2]))
    assert math.isnan(summary.set_index("variant").loc["learned", "val_loss_at_2x_seq_len_mean"])


def test_compare_figure_shows_the_loss_at_twice_the_trained_length_where_it_exists():
    """make compare: a red marker per variant at val_loss_at_2x_seq_len (mean over seeds); none for learned."""
    table = seeded_table({"rope": 3.5, "learned": math.nan})
    summary, keys = summarize(table)
    fig = plot(summary, table, keys)
    (markers,) = [line for line in fig.axes[0].lines if line.get_marker() == "D"]
    ys = dict(zip([t.get_text() for t in fig.axes[0].get_xticklabels()], markers.get_ydata()))
    assert ys["rope"] == pytest.approx(3.5 + 0.2 * 1.5) and np.isnan(ys["learned"])


def test_markdown_rows_are_named_by_variant_with_mean_and_std():
    summary = pd.DataFrame({
        "variant": ["rope, []", "rope, ['all']", "learned, []"],
        "params.model.pe": ["rope", "rope", "learned"],
        "params.model.qkv_nonlinear_heads": ["[]", "['all']", "[]"],
        "n_seeds": [3, 3, 1],
        **{f"{m}_mean": [1.0, 2.0, 3.0] for m in MARKDOWN_METRICS},
        **{f"{m}_std": [0.01, 0.02, float("nan")] for m in MARKDOWN_METRICS},
    })  # fmt: skip
    rows = [line.split(" | ") for line in markdown_table(summary).splitlines()[2:]]
    assert [row[0] for row in rows] == ["| rope", "| nonlinear_qkv ['all']", "| learned"]
    assert rows[0][2] == "1.0000 \u00b1 0.0100" and rows[2][2] == "3.0000"  # one seed: no error bar
