"""The training loop: schedule, budget, device choice, determinism, kill-and-resume, non-finite loss."""

import json
import math
import re
import shutil

import pandas as pd
import pytest
import torch
from builders import (
    PROJECT,
    TINY_TRAIN_PARAMS,
    kill_when_checkpoint_appears,
    run_stage,
    stage_command,
    stage_env,
    write_params,
    write_tokens,
)

from attnlab.core.device import cpu_flags_have_bf16, native_bf16, pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.params import ModelConfig, TrainConfig, load_params
from attnlab.training.schedule import Budget, autocast_dtype, lr_at, make_budget, precision_choice


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1)
    budget = Budget(n_params=1, total_tokens=101, steps=101, tokens_per_step=1, warmup_steps=10)  # steps 0..100
    assert lr_at(0, budget, cfg) == pytest.approx(1e-4)
    assert lr_at(9, budget, cfg) == pytest.approx(1e-3)
    assert lr_at(10, budget, cfg) == pytest.approx(1e-3)
    midway = 10 + 45
    assert lr_at(midway, budget, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, budget, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, budget, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_budget_follows_tokens_per_param_unless_max_tokens_is_set(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", {"train": {"tokens_per_param": 20}}))
    budget = make_budget(params, params.tokenizer.vocab_size)
    assert budget.total_tokens == pytest.approx(20 * budget.n_params, rel=0.01)
    assert budget.total_tokens % budget.tokens_per_step == 0
    params = load_params(write_params(tmp_path / "q.yaml", {"train": {"max_tokens": 100_000}}))
    budget = make_budget(params, params.tokenizer.vocab_size)
    assert budget.steps == 100_000 // (32 * 512)


# The train stage's bare step, bf16 autocast against fp32, side by side on a Xeon with AMX (docs/performance.md,
# "The precision rule"): (d_model, seq_len, n_layers, vocab_size, bf16 tokens/s over fp32 tokens/s).
MEASURED_BF16_OVER_FP32 = [
    (128, 128, 2, 2048, 0.88), (128, 128, 4, 8192, 1.01), (64, 512, 4, 8192, 0.89), (128, 192, 4, 8192, 1.19),
    (96, 512, 4, 8192, 1.12), (160, 128, 4, 8192, 1.14), (128, 256, 4, 8192, 1.21), (192, 128, 4, 2048, 1.22),
    (128, 512, 4, 8192, 1.27), (256, 128, 4, 2048, 1.44), (256, 256, 4, 8192, 1.62), (192, 512, 4, 8192, 1.41),
    (256, 512, 4, 8192, 1.65), (448, 512, 4, 8192, 1.87),
]


@pytest.mark.parametrize(("d_model", "seq_len", "n_layers", "vocab_size", "speedup"), MEASURED_BF16_OVER_FP32)
def test_precision_auto_picks_the_faster_precision_measured_on_a_native_bf16_cpu(d_model, seq_len, n_layers,
                                                                                  vocab_size, speedup):
    """auto against the measurements: bf16 where it was clearly faster, fp32 where it was slower; within 2% of
    a tie either is right."""
    model = ModelConfig(d_model=d_model, seq_len=seq_len, n_layers=n_layers, d_ff=4 * d_model)
    chosen = autocast_dtype(TrainConfig(precision="auto"), model, torch.device("cpu"), native=True)
    if speedup > 1.02:
        assert chosen is torch.bfloat16, (d_model, seq_len, speedup)
    elif speedup < 0.98:
        assert chosen is None, (d_model, seq_len, speedup)


def test_precision_auto_is_fp32_where_bf16_is_emulated_or_not_offered_and_explicit_choices_stand():
    auto, fp32, bf16 = TrainConfig(precision="auto"), TrainConfig(precision="fp32"), TrainConfig(precision="bf16")
    cpu = torch.device("cpu")
    study, quick = ModelConfig(d_model=128, seq_len=512), ModelConfig(d_model=128, seq_len=128)
    assert autocast_dtype(auto, study, cpu, native=False) is None  # emulated bf16: ~15x slower than fp32
    assert autocast_dtype(auto, study, torch.device("mps"), native=True) is None
    assert autocast_dtype(auto, quick, torch.device("cuda"), native=True) is torch.bfloat16  # any shape on a GPU
    assert autocast_dtype(auto, study, torch.device("cuda"), native=False) is None  # a GPU without bf16
    assert autocast_dtype(auto, study, cpu) is (torch.bfloat16 if native_bf16(cpu) else None)  # this machine's flags
    for device in (cpu, torch.device("cuda"), torch.device("mps")):  # an explicit choice is taken as it is
        for model in (quick, study):
            assert autocast_dtype(fp32, model, device, native=True) is None
            assert autocast_dtype(bf16, model, device, native=False) is torch.bfloat16
    dtype, why = precision_choice(auto, quick, cpu, native=True)
    assert dtype is None and "896" in why  # the reason names the shape's size against the rule
    assert cpu_flags_have_bf16("fpu avx2 avx512f avx512_bf16".split())
    assert cpu_flags_have_bf16("fpu avx2 amx_tile amx_bf16".split())
    assert not cpu_flags_have_bf16("fpu avx2 avx512f avx512_vnni".split())  # no bf16 instructions: emulated


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_explicit_device_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        pick_device("cuda")
    assert err.value.key == "train.device"
    assert pick_device("auto").type in ("cpu", "mps")


def _train_args(tmp_path, name, extra=None):
    overrides = json.loads(json.dumps(TINY_TRAIN_PARAMS))
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    write_params(tmp_path / "params.yaml", overrides)
    return ["--params", "params.yaml", "--tokens", "tokens", "--model", f"{name}/model.pt",
            "--checkpoints", f"{name}/checkpoints", "--metrics", f"{name}/train.json", "--step-log", f"{name}/log.tsv",
            "--val-log", f"{name}/val.tsv"]


def _train(tmp_path, name, extra=None):
    return run_stage("train.py", *_train_args(tmp_path, name, extra), cwd=tmp_path), tmp_path / name


def _train_killed(tmp_path, name, extra=None):
    """Start a run and SIGKILL it from outside once its first checkpoint is on disk, as a dying machine would."""
    cmd = stage_command("train.py", *_train_args(tmp_path, name, extra))
    killed = kill_when_checkpoint_appears(cmd, tmp_path / name / "checkpoints" / "ckpt.pt", cwd=tmp_path,
                                          env=stage_env())
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / name / "model.pt").exists()
    return killed


def _loss_metrics(out):
    metrics = json.loads((out / "train.json").read_text())
    return {k: metrics[k] for k in ("final_train_loss", "final_val_loss", "n_params", "train_tokens")}


@pytest.fixture()
def token_dir(tmp_path):
    return write_tokens(tmp_path / "tokens")


def test_training_learns_and_is_deterministic(tmp_path, token_dir):
    first, out1 = _train(tmp_path, "a")
    assert first.returncode == 0, first.stderr
    second, out2 = _train(tmp_path, "b")
    assert second.returncode == 0, second.stderr
    assert _loss_metrics(out1) == _loss_metrics(out2)  # CPU: exactly
    log = pd.read_csv(out1 / "log.tsv", sep="\t")
    assert list(log.columns) == ["step", "tokens", "loss", "lr"]
    assert log["step"].tolist() == list(range(len(log)))
    assert log["loss"].iloc[-4:].mean() < log["loss"].iloc[:4].mean() - 0.3
    drawn = run_stage("loss_curve.py", "--step-log", str(out1 / "log.tsv"), "--val-log", str(out1 / "val.tsv"),
                      "--out", str(out1 / "loss.png"), cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert (out1 / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, token_dir, dropout):
    extra = {"model": {"dropout": dropout}}  # with dropout, each step reseeds its masks: same masks on resume
    full, out_full = _train(tmp_path, "full", extra)
    assert full.returncode == 0, full.stderr
    # 32 steps, a checkpoint every 10% (3 steps): SIGKILLed from outside once the first checkpoint is on disk
    _train_killed(tmp_path, "run", extra)
    resumed, out = _train(tmp_path, "run", extra)
    assert resumed.returncode == 0, resumed.stderr
    resumed_from = json.loads((out / "train.json").read_text())["resumed_from_step"]
    assert 0 < resumed_from < 32 and resumed_from % 3 == 0  # mid-run, at one of the periodic checkpoints
    assert re.findall(r"resuming from checkpoint at step (\d+)/32", resumed.stderr) == [str(resumed_from)]
    for key, value in _loss_metrics(out_full).items():
        assert _loss_metrics(out)[key] == pytest.approx(value, abs=1e-4)
    log = pd.read_csv(out / "log.tsv", sep="\t")
    assert log["step"].tolist() == list(range(32))  # cut back to the checkpoint: no step twice


def test_a_checkpoint_from_other_params_is_not_resumed(tmp_path, token_dir):
    _train_killed(tmp_path, "run")
    other, out = _train(tmp_path, "run", extra={"train": {"lr": 0.002}})
    assert other.returncode == 0, other.stderr
    assert "from other params, data, precision or code; starting fresh" in other.stderr
    assert json.loads((out / "train.json").read_text())["resumed_from_step"] == 0


def test_a_finished_run_is_never_resumed_a_rerun_trains_from_step_zero(tmp_path, token_dir):
    first, out = _train(tmp_path, "run")
    assert first.returncode == 0, first.stderr
    before = _loss_metrics(out)
    again, out = _train(tmp_path, "run")  # the stage reruns because something it depends on changed
    assert again.returncode == 0, again.stderr
    assert "is of a finished run; training again from step 0" in again.stderr
    metrics = json.loads((out / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["tokens_per_sec"] > 0
    assert _loss_metrics(out) == before  # the same params and code: the same run again


def test_an_interrupted_run_whose_code_changed_starts_fresh(tmp_path, token_dir):
    """The fingerprint covers the source the train stage runs: a killed run resumes only under the same code."""
    src = tmp_path / "src"
    shutil.copytree(PROJECT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = stage_env({"PYTHONPATH": str(src)})
    cmd = stage_command("train.py", *_train_args(tmp_path, "run"))
    killed = kill_when_checkpoint_appears(cmd, tmp_path / "run" / "checkpoints" / "ckpt.pt", cwd=tmp_path, env=env)
    assert killed.returncode == -9, killed.stderr
    module = src / "attnlab/model/transformer.py"
    module.write_text(module.read_text() + "# a one-line edit\n")
    resumed = run_stage("train.py", *_train_args(tmp_path, "run"), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "starting fresh" in resumed.stderr and "resuming" not in resumed.stderr
    assert json.loads((tmp_path / "run" / "train.json").read_text())["resumed_from_step"] == 0


def test_train_json_names_the_resolved_precision_and_the_fp32_validation(tmp_path, token_dir):
    result, out = _train(tmp_path, "run", extra={"train": {"precision": "auto"}})
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "train.json").read_text())
    assert metrics["precision"] in ("fp32", "bf16") and metrics["val_precision"] == "fp32"
    said = "(bf16 autocast: auto: " if metrics["precision"] == "bf16" else "(fp32: auto: "
    assert said in result.stderr and metrics["precision_reason"].startswith("auto: ")  # said at the start, and kept
    if native_bf16(torch.device("cpu")):  # d_model 32, seq_len 32: too small for bf16 to gain
        assert metrics["precision"] == "fp32" and "= 224 < " in metrics["precision_reason"]


def test_a_non_finite_loss_stops_with_a_message_naming_the_step(tmp_path, token_dir):
    result, out = _train(tmp_path, "nan", extra={"train": {"lr": 1e6, "grad_clip": 0}})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: loss is nan at step ") or last.startswith("error: train: loss is inf")
    assert not (out / "model.pt").exists()
