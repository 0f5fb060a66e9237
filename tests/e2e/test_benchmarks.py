"""The benchmarks end to end, each a real run at a tiny shape: `make bench` writes every key of the committed
reports/bench.json, timing the loop leaves its training unchanged, `make gpu-check DRY_RUN=1` writes its report
on the CPU, the reference against a model file keeps to its budget."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from builders import TINY_TRAIN_PARAMS, write_params, write_tokens

from attnlab.core.params import load_params
from attnlab.training.schedule import make_budget
from benchmarks import bench
from benchmarks.common import LoopTimer, stage_step, train_stage
from structure import ROOT

pytestmark = pytest.mark.e2e

TINY_STUDY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32, "batch_size": 2, "vocab_size": 512}
TINY_BENCH = ["--steps", "2", "--reps", "1", "--warmup", "0",
              "--mm-size", "64", "--mm-seconds", "0.05", "--device", "cpu", "--bf16", "on", "--study-steps", "12",
              *[arg for key, value in TINY_STUDY.items() for arg in ("--study-shape", f"{key}={value}")]]
BF16_KEYS = {  # written only where bf16 runs (reports/bench.json may come from a machine without native bf16)
    "train_tok_s_bf16", "torch_encoder_tok_s_bf16", "train_vs_torch_encoder_bf16", "matmul_peak_bf16_flop_s",
    "bf16_peak_source", "matmul_bf16_vs_fp32", "achieved_flop_s_bf16", "mfu_bf16", "torch_encoder_mfu_bf16",
    "reference_loop_tok_s_bf16", "reference_loop_tok_s_bf16_study_shape",
}


def test_bench_writes_every_key_of_the_committed_report(tmp_path, capsys):
    tokens = write_tokens(tmp_path / "tokens")
    params = write_params(tmp_path / "params.yaml", TINY_TRAIN_PARAMS)
    out = tmp_path / "bench.json"
    bench.main(TINY_BENCH + ["--tokens", str(tokens), "--params", str(params), "--set", "eval.max_tokens=640",
                             "--set", "seed=3", "--out", str(out)])
    results, committed = json.loads(out.read_text()), json.loads((ROOT / "reports/bench.json").read_text())
    assert set(results) == set(committed) - {"bf16_skipped"} | BF16_KEYS
    assert set(results["config"]) == set(committed["config"])
    assert list(results["section_seconds"]) == list(committed["section_seconds"])
    figures = {k: v for k, v in results.items() if isinstance(v, float)}
    assert all(map(math.isfinite, figures.values())), figures
    assert results["config"]["token_source"] == f"{tokens}/train.bin" and results["config"]["d_model"] == 32
    assert results["quality_val_tokens"] == 640 and "seed 3" in results["quality_shape"]  # --set reaches quality
    assert results["study_shape"] == ", ".join(f"{key} {value}" for key, value in TINY_STUDY.items())
    assert results["train_loop_precision_study_shape"] == "fp32"  # a tiny shape: fp32 is the faster by the rule
    assert {results["reference_precision"], results["reference_precision_study_shape"]} <= {"fp32", "bf16"}
    assert "train_loop_vs_step" in capsys.readouterr().out


def test_timing_the_loop_with_partners_leaves_its_training_unchanged(tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    few_evals = {**TINY_TRAIN_PARAMS["train"], "eval_every_frac": 0.5, "checkpoint_every_frac": 0.5}
    params = load_params(write_params(tmp_path / "params.yaml", {**TINY_TRAIN_PARAMS, "train": few_evals}))
    timer = LoopTimer({"bare_step": stage_step(params, tokens, tmp_path / "partner")})
    timed_metrics, timed_model = train_stage(params, tokens, on_log=timer)
    plain_metrics, plain_model = train_stage(params, tokens)
    assert len(timer.windows) >= 2 and timer.tok_s()["bare_step"] > 0
    assert timed_metrics["final_val_loss"] == plain_metrics["final_val_loss"]
    for (name, a), b in zip(timed_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


def make_variable(name: str, cwd) -> list[str]:
    """A variable of the project's Makefile as make expands it, split as the shell splits a command line."""
    proc = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-f", "-", "--no-print-directory", "-n", "clean-venv"],
                          input=f"$(info $({name}))\n", capture_output=True, text=True, cwd=cwd, check=True)
    return shlex.split(proc.stdout.splitlines()[0])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_gpu_check_dry_run_writes_its_report_on_the_cpu(tmp_path):
    """`make gpu-check DRY_RUN=1`'s own arguments (the Makefile's GPU_CHECK_DRY_RUN), run from an empty folder:
    no token files there, so on synthetic ones."""
    out = tmp_path / "reports" / "gpu_check.json"
    argv = ["-m", "benchmarks.bench", "--only", "gpu_check", "--out", str(out), "--params", str(ROOT / "params.yaml"),
            *make_variable("GPU_CHECK_DRY_RUN", tmp_path)]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["device"].startswith("cpu") and results["precision"] == "bf16" and results["compiled"] is False
    assert results["steps"] == 24 and results["timed_steps"] == 24 - 8  # the windows after the warm-up steps
    study = load_params(ROOT / "params.yaml")  # the full study's budget, not the dry run's tiny one
    assert results["full_study_tokens"] == make_budget(study, study.tokenizer.vocab_size).total_tokens
    assert results["peak_source"] == "measured bf16 matmul" and math.isfinite(results["mfu"])
    assert results["attention_rows"] == 2 * 4 * 2 * 2 * 32  # splits x examples x layers x heads x positions
    assert list(results["section_seconds"]) == ["gpu_check"] and results["config"]["d_model"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # the rest lived in a temporary folder


def test_the_compile_section_times_both_shapes_and_projects_the_budget(tmp_path):
    tokens = write_tokens(tmp_path / "tokens")
    params = write_params(tmp_path / "params.yaml", TINY_TRAIN_PARAMS)
    out = tmp_path / "compile.json"
    bench.main(["--only", "compile", "--tokens", str(tokens), "--params", str(params), "--steps", "1", "--reps", "1",
                "--device", "cpu", "--out", str(out),
                *[arg for key, value in TINY_STUDY.items() for arg in ("--study-shape", f"{key}={value}")]])
    results = json.loads(out.read_text())
    assert list(results["section_seconds"]) == ["compile"]
    for suffix in ("", "_study_shape"):
        assert results[f"compile_seconds{suffix}"] >= 0 and math.isfinite(results[f"compiled_vs_eager{suffix}"])
    assert results["run_tokens"] == 8192 and results["run_minutes_compiled"] > 0


def test_the_reference_against_a_trained_model_file_matches_its_budget_and_refuses_another(tmp_path):
    import dataclasses

    from attnlab.core.errors import ConfigError
    from attnlab.model.checkpoint import save_model
    from attnlab.model.scoring import score_windows
    from attnlab.data.tokens import eval_starts, load_tokens
    from benchmarks.bench_quality import reference_against_model

    tokens = write_tokens(tmp_path / "tokens")
    params = load_params(write_params(tmp_path / "params.yaml", TINY_TRAIN_PARAMS))
    metrics, model = train_stage(params, tokens)
    save_model(tmp_path / "model.pt", model, meta={"train_metrics": metrics})
    result = reference_against_model(params, tokens, tmp_path / "model.pt", "auto")
    val = load_tokens(tokens, "val")
    seq_len = params.model.seq_len
    ours = score_windows(model, val, eval_starts(len(val), seq_len, params.eval.max_tokens), seq_len, 4)
    assert result["attnlab_val_loss"] == round(ours.loss, 4)  # the model file, scored on evaluate's windows
    assert result["reference_precision"] == metrics["precision"]
    assert math.isfinite(result["reference_val_loss"]) and result["reference_val_loss"] < result["unigram_loss"] + 1
    assert f"{make_budget(params, 512).total_tokens:,} tokens" in result["shape"]
    longer_train = dataclasses.replace(params.train, max_tokens=2 * metrics["train_tokens"])
    longer = dataclasses.replace(params, train=longer_train)
    with pytest.raises(ConfigError, match="trained on"):
        reference_against_model(longer, tokens, tmp_path / "model.pt", "fp32")
