"""`make gpu-check` (benchmarks/bench.py's gpu_check section): a machine without CUDA and too few steps stop it
before any work, in one line. (The dry run end to end: tests/e2e/test_benchmarks.py.)"""

from __future__ import annotations

import torch

from attnlab.core.cli import run_cli
from benchmarks import bench
from structure import ROOT


def test_without_cuda_it_refuses_before_any_work_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    argv = ["--only", "gpu_check", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "g.json")]
    assert run_cli(bench.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --only gpu_check:") and "CUDA" in err, err
    assert "DRY_RUN=1" in err and not any(tmp_path.iterdir())  # no data, no model, no report


def test_too_few_steps_for_a_timed_window_is_one_error_line(tmp_path, capsys):
    argv = ["--only", "gpu_check", "--device", "cpu", "--params", str(ROOT / "params.yaml"), "--check-steps", "9",
            "--check-warmup", "8", "--set", "train.log_every=4", "--out", str(tmp_path / "g.json")]
    assert run_cli(bench.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --check-steps:") and "train.log_every=4" in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
