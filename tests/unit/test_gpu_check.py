"""benchmarks/gpu_check.py (`make gpu-check`): bad input and a machine without CUDA stop it before any work, in
one line; its timed run is a budget of exactly --steps steps. (The dry run end to end: tests/e2e/test_benchmarks.py.)"""

from __future__ import annotations

import pytest
import torch

from attnlab.core.cli import run_cli
from attnlab.training.schedule import make_budget
from benchmarks import gpu_check
from structure import ROOT


def test_without_cuda_it_refuses_before_any_work_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert run_cli(gpu_check.main, ["--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "CUDA" in err and "DRY_RUN=1" in err, err
    assert not any(tmp_path.iterdir())  # no data, no model, no report


def test_too_few_steps_for_a_timed_window_is_one_error_line(tmp_path, capsys):
    args = ["--dry-run", "--params", str(ROOT / "params.yaml"), "--steps", "9", "--warmup-steps", "8"]
    assert run_cli(gpu_check.main, args + ["--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --steps:") and "train.log_every=4" in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_timed_run_is_steps_steps_of_the_study_shape_in_bf16(dry_run):
    args = gpu_check.parse_args(["--params", str(ROOT / "params.yaml"), "--steps", "37"] + ["--dry-run"] * dry_run)
    params = gpu_check.run_params(args, vocab_size=500)
    assert make_budget(params, 500).steps == 37
    assert params.train.precision == "bf16" and params.tokenizer.vocab_size == 500
    assert params.train.device == ("cpu" if dry_run else "cuda")
