"""benchmarks/gpu_check.py (`make gpu-check`): the dry run writes every key, and without CUDA it refuses cleanly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from attnlab.core.params import load_params
from attnlab.training.schedule import make_budget
from structure import ROOT

KEYS = {  # key: must be > 0
    "tokens_per_sec": True, "tokens_per_sec_train_json": True, "mfu": True, "peak_flop_s": True,
    "matmul_peak_bf16_flop_s": True, "achieved_flop_s": True, "flops_per_token": True, "peak_memory_mb": True,
    "projected_full_study_minutes": True, "full_study_tokens": True, "n_params": True, "steps": True,
    "timed_steps": True, "attention_rows": True, "final_train_loss": True, "final_val_loss": True,
    "data_seconds": True, "matmul_peak_seconds": True, "train_seconds": True, "analysis_seconds": True,
    "wall_seconds": True, "startup_and_compile_seconds": False,
}


def gpu_check(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])})


def test_dry_run_writes_every_key_on_the_cpu(tmp_path):
    out = tmp_path / "reports" / "gpu_check.json"
    proc = gpu_check("--dry-run", "--params", str(ROOT / "params.yaml"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["dry_run"] is True
    assert results["precision"] == "bf16" and results["compiled"] is False  # torch.compile is CUDA-only in train
    for key, positive in KEYS.items():
        assert isinstance(results[key], (int, float)) and math.isfinite(results[key]), key
        assert results[key] > 0 if positive else True, key
    assert results["peak_source"] == "measured bf16 matmul"
    assert results["mfu"] == pytest.approx(results["tokens_per_sec"] * results["flops_per_token"]
                                           / results["peak_flop_s"], rel=1e-3)
    assert results["projected_full_study_minutes"] == pytest.approx(
        results["full_study_tokens"] / results["tokens_per_sec"] / 60, rel=1e-3)
    study = load_params(ROOT / "params.yaml")  # the full study's budget, not the dry run's tiny one
    assert results["full_study_tokens"] == make_budget(study, study.tokenizer.vocab_size).total_tokens
    assert results["timed_steps"] < results["steps"]  # the warm-up steps are left out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # the rest lived in a temporary folder
    assert "gpu-check on cpu" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_before_any_work_in_one_line(tmp_path):
    out = tmp_path / "reports" / "gpu_check.json"
    proc = gpu_check("--params", str(ROOT / "params.yaml"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "CUDA" in last and last.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "DRY_RUN=1" in last
    assert not any(tmp_path.iterdir())  # no data, no model, no report
