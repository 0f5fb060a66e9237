"""benchmarks/precision_seeds.py: the summary and table from hand-made runs, and bad input (real runs:
tests/e2e/test_benchmarks.py)."""

from __future__ import annotations

import pytest

from attnlab.core.cli import run_cli
from benchmarks import precision_seeds

RUNS = [
    {"precision": "fp32", "seed": 1, "val_loss": 3.36, "tokens_per_sec": 100.0},
    {"precision": "fp32", "seed": 2, "val_loss": 3.39, "tokens_per_sec": 110.0},
    {"precision": "fp32", "seed": 3, "val_loss": 3.37, "tokens_per_sec": 90.0},
    {"precision": "bf16", "seed": 1, "val_loss": 3.38, "tokens_per_sec": 10.0},
    {"precision": "bf16", "seed": 2, "val_loss": 3.40, "tokens_per_sec": 12.0},
    {"precision": "bf16", "seed": 3, "val_loss": 3.36, "tokens_per_sec": 11.0},
]


def test_summary_pairs_seeds_and_checks_the_fp32_range():
    summary = precision_seeds.summarize(RUNS)
    assert summary["fp32"] == {"mean": pytest.approx(3.3733, abs=1e-4), "std": pytest.approx(0.0153, abs=1e-4),
                               "min": 3.36, "max": 3.39}
    assert summary["bf16"]["mean"] == pytest.approx(3.38)
    assert summary["bf16_minus_fp32_by_seed"] == {1: 0.02, 2: 0.01, 3: -0.01}
    assert summary["bf16_minus_fp32_mean"] == pytest.approx(0.0067, abs=1e-4)
    assert summary["bf16_within_fp32_seed_range"] is True
    worse = [dict(r, val_loss=r["val_loss"] + 0.1) if r["precision"] == "bf16" else r for r in RUNS]
    assert precision_seeds.summarize(worse)["bf16_within_fp32_seed_range"] is False
    table = precision_seeds.markdown(RUNS, summary)
    assert "| fp32 | 3.3600 | 3.3900 | 3.3700 | 3.3733 ± 0.0153 | 100 |" in table
    assert "| bf16 − fp32 | +0.0200 | +0.0100 | -0.0100 | +0.0067 | |" in table


@pytest.mark.parametrize(("args", "key"), [(["--jobs", "0"], "--jobs"), (["--seeds", "1", "1"], "--seeds"),
                                           (["--tokens", "nowhere"], "--tokens")])
def test_bad_input_is_one_error_line_before_any_run(args, key, tmp_path, capsys):
    out = tmp_path / "precision.json"
    assert run_cli(precision_seeds.main, ["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}:") and len(err.splitlines()) == 1, err
    assert not out.exists()
