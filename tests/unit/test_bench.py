"""benchmarks/: the pieces every bench relies on, each against an independent reference or a property (the
whole runs are in tests/e2e/test_benchmarks.py)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnlab.analysis.capture import explicit_attention
from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.core.params import ModelConfig, load_params
from attnlab.model.transformer import Transformer, count_parameters, flops_per_token, lm_loss
from attnlab.training.loop import LogEvent
from benchmarks import bench
from benchmarks.common import PARTNER_WARMUP, LoopTimer, loop_speed_keys, parse_overrides, side_by_side
from benchmarks.reference import TorchEncoderLM
from structure import ROOT


def test_flops_per_token_is_the_matmul_count_of_a_training_step():
    """The bench's MFU numerator against torch's FlopCounterMode on one fwd + bwd of a tiny model (explicit
    attention, so that the T x T matmuls are counted too). The formula's 6 x params also counts the parameters
    that do no matmul, by hand: per layer 4 x 32 projection biases + 64 + 32 MLP biases + 2 LayerNorms x 2 x 32,
    = 352, x 2 layers, + the final LayerNorm's 64 = 768."""
    cfg, vocab = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16, norm="pre"), 100
    model = Transformer(cfg, vocab)
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    with FlopCounterMode(display=False) as counter, explicit_attention(model):
        lm_loss(model(x), x).backward()
    counted_per_token = counter.get_total_flops() / x.numel()
    assert flops_per_token(cfg, count_parameters(cfg, vocab)) - 6 * 768 == counted_per_token


def fake_loop(timer: LoopTimer, windows: int, window_s: float, validation_s: float) -> None:
    """A loop whose windows take window_s each, with a validation of validation_s after every event."""
    started, validation = time.perf_counter(), 0.0
    for w in range(windows + 1):
        time.sleep(window_s)
        timer(LogEvent(step=4 * (w + 1), tokens=40 * (w + 1), loss=1.0,
                       train_seconds=time.perf_counter() - started - validation))
        start = time.perf_counter()
        time.sleep(validation_s)
        validation += time.perf_counter() - start


def test_loop_timer_windows_are_disjoint_spans_that_leave_out_partners_and_validation():
    calls: dict[str, list[int]] = {"a": [], "b": []}

    def partner(name: str):
        def step(i: int) -> None:
            calls[name].append(i)
            time.sleep(0.01)  # 4 steps: 0.04 s, twice the loop's own window
        return step

    timer = LoopTimer({"a": partner("a"), "b": partner("b")})
    fake_loop(timer, windows=3, window_s=0.02, validation_s=0.03)
    assert len(timer.windows) == 3  # the first event only starts the clock
    for window in timer.windows:
        assert 0.02 <= window["loop"] < 0.035, window  # had a partner's or validation's time leaked in: >= 0.05
        assert window["a"] >= 0.04 and window["b"] >= 0.04 and window["steps"] == 4 and window["tokens"] == 40
    spans = sorted(timer.spans, key=lambda span: span[1])
    assert all(end <= next_start for (_, _, end), (_, next_start, _) in zip(spans, spans[1:]))
    assert [name for name, _, _ in timer.spans] == ["loop", "a", "b", "loop", "b", "a", "loop", "a", "b"]
    assert calls["a"] == calls["b"] == list(range(PARTNER_WARMUP + 12))  # warm-up, then one step per loop step
    assert timer.tok_s()["loop"] == pytest.approx(120 / sum(w["loop"] for w in timer.windows))


def test_loop_timer_counts_only_windows_after_the_warmup_and_refuses_none():
    timer = LoopTimer(after_step=8)
    fake_loop(timer, windows=3, window_s=0.0, validation_s=0.0)  # events at steps 4, 8, 12, 16
    assert [w["steps"] for w in timer.windows] == [4, 4]  # 8 -> 12 and 12 -> 16
    with pytest.raises(RuntimeError, match="no log flush after step 99"):
        LoopTimer(after_step=99).tok_s()


def test_side_by_side_alternates_the_runs_and_gives_each_its_own_steps():
    order: list[tuple[str, int]] = []
    runs = {name: (lambda i, name=name: order.append((name, i))) for name in ("x", "y")}
    tok_s = side_by_side(runs, steps=2, reps=3, warmup=1, tokens_per_step=10, device=torch.device("cpu"))
    assert order == [("x", 0), ("y", 0), ("x", 1), ("x", 2), ("y", 1), ("y", 2), ("y", 3), ("y", 4), ("x", 3),
                     ("x", 4), ("x", 5), ("x", 6), ("y", 5), ("y", 6)]
    assert set(tok_s) == {"x", "y"}


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_torch_reference_has_attnlab_shape_and_is_causal(norm):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16, norm=norm)
    reference = TorchEncoderLM(cfg, 100).eval()
    assert sum(p.numel() for p in reference.parameters()) == count_parameters(cfg, 100)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    with torch.no_grad():
        before, after = reference(idx), reference(changed)
    assert before.shape == (2, 16, 100)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)
    assert (after[:, 9] - before[:, 9]).abs().max() > 1e-4


def test_overrides_parse_as_dvc_set_does():
    assert parse_overrides(["model.d_model=128", "seed=2", "attention.seq_len_filter=[32,64]", "train.lr=3e-3",
                            "model.pe='rope'"]) == {
        "model": {"d_model": 128, "pe": "rope"}, "seed": 2, "attention": {"seq_len_filter": [32, 64]},
        "train": {"lr": 0.003}}
    for bad in ("model.d_model", "seed=1,2", "~seed"):
        with pytest.raises(ConfigError, match="--set"):
            parse_overrides([bad])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("target", ["bench", "bench-compile"])
def test_make_passes_the_quick_profile_as_set_overrides_the_params_accept(target, tmp_path):
    """The Makefile's QUICK_PARAMS is the quick profile's one definition: make's own expansion of the target's
    command, parsed as the bench parses it, gives params that load, at the quick profile's shape."""
    command = ["make", "-f", str(ROOT / "Makefile"), "--no-print-directory", "-n", "-o", ".venv/bin/.installed",
               "VENV=.venv", target]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True)
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    sets = [value for flag, value in zip(words, words[1:]) if flag == "--set"]
    params = load_params(ROOT / "params.yaml", parse_overrides(sets))
    assert len(sets) > 10 and tuple(params.attention.seq_len_filter) == (32, 64)  # a quoted list survives the parse
    assert (params.model.d_model, params.model.seq_len) == (128, 128) and params.train.max_tokens == 2_000_000


@pytest.mark.parametrize(("args", "key"), [
    (["--steps", "0"], "--steps"), (["--set", "model.d_model=30", "--set", "model.n_heads=4"], "model.d_model"),
    (["--set", "model.pe=xpos"], "model.pe"), (["--mm-seconds", "0"], "--mm-seconds"), (["--set", "seed"], "--set"),
    (["--set", "seed=1,2"], "--set"), (["--warmup", "-1"], "--warmup"),
    (["--study-shape", "d_model=0"], "--study-shape"), (["--study-shape", "depth=4"], "--study-shape"),
    (["--study-shape", "d_model=30"], "model.d_model"), (["--study-steps", "0"], "--study-steps"),
])
def test_bad_bench_input_is_one_error_line_before_any_run(args, key, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--params", str(ROOT / "params.yaml"), "--tokens", str(tmp_path), "--out", str(out)]
    assert run_cli(bench.main, argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}:") and len(err.splitlines()) == 1, err
    assert not out.exists() and not any(p.name != "bench.json" for p in tmp_path.iterdir())


def test_loop_speed_keys_hold_the_loop_against_the_faster_reference():
    speeds = {"loop": 90.0, "bare_step": 100.0, "reference_fp32": 80.0, "reference_bf16": 120.0}
    keys = loop_speed_keys(speeds, "bf16", "_x")
    assert keys["reference_loop_tok_s_x"] == 120.0 and keys["reference_precision_x"] == "bf16"
    assert keys["reference_loop_tok_s_fp32_x"] == 80.0 and keys["reference_loop_tok_s_bf16_x"] == 120.0
    assert keys["stage_vs_reference_speed_x"] == 0.75 and keys["train_loop_vs_step_x"] == 0.9
    assert keys["train_loop_precision_x"] == "bf16"
    alone = loop_speed_keys({"loop": 90.0, "bare_step": 100.0, "reference_fp32": 80.0}, "fp32")
    assert alone["reference_precision"] == "fp32" and alone["stage_vs_reference_speed"] == 1.125
