"""benchmarks/bench.py: a real run at a tiny shape, the torch reference it compares against, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.core.cli import run_cli
from attnlab.core.params import ModelConfig
from attnlab.model.transformer import Transformer, count_parameters
from benchmarks import bench

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "64", "--seq-len", "32",
        "--batch-size", "2", "--vocab-size", "400", "--steps", "2", "--reps", "1", "--warmup", "0",
        "--loss-steps", "2", "--mm-size", "64", "--mm-seconds", "0.05", "--device", "cpu", "--bf16", "on"]
REQUIRED = [
    "train_tok_s", "torch_encoder_tok_s", "train_vs_torch_encoder", "mfu_fp32",
    "train_tok_s_bf16", "torch_encoder_tok_s_bf16", "train_vs_torch_encoder_bf16", "mfu_bf16",
    "sdpa_fwd_tok_s", "explicit_fwd_tok_s", "bf16_loss_gap", "device", "config",
]


def test_bench_writes_every_key_at_a_tiny_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/tokens here: the synthetic stream is used
    out = tmp_path / "reports" / "bench.json"
    bench.main(TINY + ["--out", str(out)])
    results = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in results, key
    for key in REQUIRED[:-3]:
        assert np.isfinite(results[key]), key
    assert results["train_tok_s"] > 0 and results["torch_encoder_tok_s"] > 0
    assert results["train_vs_torch_encoder"] == pytest.approx(results["train_tok_s"] / results["torch_encoder_tok_s"])
    assert results["config"]["d_model"] == 32 and results["config"]["batch_size"] == 2
    assert results["config"]["token_source"] == "synthetic"
    assert len(results["loss_curve_fp32"]) == len(results["loss_curve_bf16"]) == 2
    assert list(results["section_seconds"]) == [name for name, _ in bench.SECTIONS] + ["quality"]
    assert results["train_loop_tok_s_bench_shape"] > 0  # the train stage's own loop, at the bench shape
    assert results["train_loop_vs_step_bench_shape"] == pytest.approx(
        results["train_loop_tok_s_bench_shape"] / results["bare_step_tok_s_bench_shape"], rel=1e-3)
    assert "no token files" in results["quality_skipped"]
    printed = capsys.readouterr().out
    assert "attnlab / torch, fp32" in printed and "MFU bf16" in printed


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_torch_reference_has_attnlab_shape_and_is_causal(norm):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16, norm=norm)
    reference = bench.TorchEncoderLM(cfg, 100).eval()
    assert sum(p.numel() for p in reference.parameters()) == count_parameters(cfg, 100)
    assert sum(p.numel() for p in Transformer(cfg, 100).parameters()) == count_parameters(cfg, 100)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    with torch.no_grad():
        before, after = reference(idx), reference(changed)
    assert before.shape == (2, 16, 100)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)
    assert (after[:, 9] - before[:, 9]).abs().max() > 1e-4


def test_synthetic_stream_is_fixed_and_learnable():
    a, b = bench.synthetic_stream(300, 5000, seed=3), bench.synthetic_stream(300, 5000, seed=3)
    assert a.dtype == np.uint16 and a.shape == (5000,) and a.max() < 300
    assert np.array_equal(a, b)
    # Structure: each token is followed by at most 4 distinct tokens outside the copied spans, so the
    # bigram table is far sparser than for uniform noise.
    successors = {(int(x), int(y)) for x, y in zip(a[:-1], a[1:])}
    assert len(successors) < 0.5 * len(set(zip(np.random.default_rng(0).integers(0, 300, 5000)[:-1].tolist(),
                                                np.random.default_rng(0).integers(0, 300, 5000)[1:].tolist())))


@pytest.mark.parametrize(
    ("args", "key"),
    [(["--steps", "0"], "--steps"), (["--d-model", "30", "--n-heads", "4"], "model.d_model"),
     (["--pe", "alibi"], "model.pe"), (["--mm-seconds", "0"], "--mm-seconds")],
)
def test_bad_bench_input_is_one_error_line(args, key, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run_cli(bench.main, ["--device", "cpu", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}:"), err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_quality_section_trains_both_models_and_scores_them_on_evaluates_windows(tmp_path, monkeypatch):
    """`make bench`'s quality keys from a real run of the train stage's function and the reference GPT."""
    from builders import TINY_TRAIN_PARAMS, write_params, write_tokens

    monkeypatch.chdir(tmp_path)
    write_tokens(tmp_path / "data" / "tokens")
    write_params(tmp_path / "params.yaml", TINY_TRAIN_PARAMS)
    args = bench.parse_args(["--params", "params.yaml", "--set", "eval.max_tokens=640", "--set", "seed=3"])
    results = bench.quality(args, log=print)
    assert results["quality_val_tokens"] == 640
    for key in ("quality_unigram_loss", "quality_attnlab_val_loss", "quality_reference_val_loss"):
        assert 0 < results[key] < 10, key
    assert results["quality_vs_reference"] == pytest.approx(
        results["quality_attnlab_val_loss"] / results["quality_reference_val_loss"], abs=1e-3)
    assert "seed 3" in results["quality_shape"]
    # speed at the same shape in the same run: the stage's loop (validation left out), its bare step, the reference
    for key in ("train_loop_tok_s", "bare_step_tok_s", "reference_loop_tok_s", "quality_reference_tok_s"):
        assert np.isfinite(results[key]) and results[key] > 0, key
    assert results["train_loop_eval_seconds"] >= 0
    assert results["train_loop_windows"] >= 1 and results["train_loop_steps_timed"] >= results["train_loop_windows"]
    assert results["train_loop_vs_step"] == pytest.approx(
        results["train_loop_tok_s"] / results["bare_step_tok_s"], rel=1e-3)
    assert results["stage_vs_reference_speed"] == pytest.approx(
        results["train_loop_tok_s"] / results["reference_loop_tok_s"], rel=1e-3)
    table = bench.format_table({"device": "cpu", **results})
    assert "loop / bare step" in table and "stage loop / reference" in table


def test_overrides_parse_as_dvc_set_does():
    assert bench.parse_overrides(["model.d_model=128", "seed=2", "attention.seq_len_filter=[32,64]"]) == {
        "model": {"d_model": 128}, "seed": 2, "attention": {"seq_len_filter": [32, 64]}}
    with pytest.raises(Exception, match="--set"):
        bench.parse_overrides(["model.d_model"])


def test_interleaved_timing_counts_each_side_apart_and_leaves_the_run_unchanged(tmp_path):
    """bench_quality.Interleaved: partner steps run between the loop's windows are timed on their own, kept out of
    the loop's time (as is validation), and change nothing in what the train stage computes."""
    import time

    from builders import TINY_TRAIN_PARAMS, write_params, write_tokens

    from attnlab.core.params import load_params
    from benchmarks.bench_quality import PARTNER_WARMUP, Interleaved, train_attnlab

    tokens = write_tokens(tmp_path / "tokens")
    tiny = {**TINY_TRAIN_PARAMS, "train": {**TINY_TRAIN_PARAMS["train"], "checkpoint_every_frac": 0.5}}
    params = load_params(write_params(tmp_path / "params.yaml", tiny))  # flushes every 4 steps, checkpoints at 16
    steps_per_run = params.train.max_tokens // (params.train.batch_size * params.model.seq_len)  # 32
    calls: list[int] = []

    def slow_partner(i: int) -> None:  # far slower than a tiny step, so its time counted twice would show
        calls.append(i)
        time.sleep(0.05)

    timer = Interleaved({"slow": slow_partner}, tokens_per_step=256, device=torch.device("cpu"))
    timed_metrics, timed_model = train_attnlab(params, tokens, on_flush=timer.on_flush)
    plain_metrics, plain_model = train_attnlab(params, tokens)

    log_every = params.train.log_every
    assert timer.windows == steps_per_run // log_every - 1  # every flush but the first closes a window
    assert timer.steps == steps_per_run - log_every
    assert calls == list(range(PARTNER_WARMUP + timer.steps))  # warm-up, then one step per loop step, in order
    assert timer.seconds["slow"] >= 0.05 * timer.steps
    # The windows, the partner's runs and validation are disjoint spans of the loop's wall time (train.json's
    # wall_seconds); had the partner's 1.4 s also been counted as the loop's, the sum would exceed it.
    assert timer.seconds["loop"] + timer.seconds["slow"] + timed_metrics["eval_seconds"] \
        <= timed_metrics["wall_seconds"] + 0.01
    speeds = timer.tok_s()
    assert speeds["slow"] == pytest.approx(timer.steps * 256 / timer.seconds["slow"])
    assert timed_metrics["final_val_loss"] == plain_metrics["final_val_loss"]
    for (name, a), b in zip(timed_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_interleaved_timing_refuses_a_run_with_no_window():
    from benchmarks.bench_quality import Interleaved

    with pytest.raises(RuntimeError, match="no window"):
        Interleaved({}, tokens_per_step=1, device=torch.device("cpu")).tok_s()
