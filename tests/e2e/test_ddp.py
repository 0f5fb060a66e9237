"""Data-parallel training under a real `torchrun --nproc_per_node 2` (gloo on CPU)."""

import json

import pandas as pd
import pytest
from builders import (
    TINY_TRAIN_PARAMS,
    kill_when_checkpoint_appears,
    run_stage,
    stage_command,
    stage_env,
    write_params,
    write_tokens,
)


def _train_args(tmp_path, name, nproc, backend="auto"):
    overrides = json.loads(json.dumps(TINY_TRAIN_PARAMS))
    # fp32 pinned: the 1- and 2-process runs sum gradients in another order, and under bf16 autocast (what
    # precision auto picks on a CPU with native bf16) that moves step losses by more than the tolerance below
    overrides["train"].update({"nproc_per_node": nproc, "backend": backend, "precision": "fp32"})
    write_params(tmp_path / f"{name}.yaml", overrides)
    return ["--params", f"{name}.yaml", "--tokens", "tokens", "--model", f"{name}/model.pt",
            "--checkpoints", "shared-checkpoints", "--metrics", f"{name}/train.json",
            "--step-log", f"{name}/log.tsv", "--val-log", f"{name}/val.tsv"]


def _train(tmp_path, name, nproc, backend="auto"):
    return run_stage("train.py", *_train_args(tmp_path, name, nproc, backend), cwd=tmp_path)


def test_two_processes_match_one_and_a_killed_two_process_run_resumes_under_one(tmp_path):
    write_tokens(tmp_path / "tokens")
    one = _train(tmp_path, "one", 1)
    assert one.returncode == 0, one.stderr
    # the 1-process run's checkpoint is of a finished run, so the 2-process run starts from step 0
    two = _train(tmp_path, "two", 2)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stderr and "is of a finished run" in two.stderr
    log1 = pd.read_csv(tmp_path / "one" / "log.tsv", sep="\t")
    log2 = pd.read_csv(tmp_path / "two" / "log.tsv", sep="\t")
    assert log1["step"].tolist() == log2["step"].tolist()
    assert log2["loss"].to_numpy() == pytest.approx(log1["loss"].to_numpy(), abs=1e-4)  # the same loss curve
    m1 = json.loads((tmp_path / "one" / "train.json").read_text())
    m2 = json.loads((tmp_path / "two" / "train.json").read_text())
    assert m2["world_size"] == 2
    assert m2["final_val_loss"] == pytest.approx(m1["final_val_loss"], abs=1e-4)

    # a 2-process run SIGKILLed from outside (torchrun and both workers) once its first checkpoint (every 10%
    # of the 32 steps: 3) is on disk, resumed under 1 process
    cmd = stage_command("train.py", *_train_args(tmp_path, "resumed", 2))
    killed = kill_when_checkpoint_appears(cmd, tmp_path / "shared-checkpoints" / "ckpt.pt", cwd=tmp_path,
                                          env=stage_env())
    assert killed.returncode == -9, killed.stderr
    assert "2 process(es)" in killed.stderr
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = _train(tmp_path, "resumed", 1)
    assert resumed.returncode == 0, resumed.stderr
    m3 = json.loads((tmp_path / "resumed" / "train.json").read_text())
    assert 0 < m3["resumed_from_step"] < 32 and m3["resumed_from_step"] % 3 == 0
    assert f"resuming from checkpoint at step {m3['resumed_from_step']}/32" in resumed.stderr
    assert m3["final_train_loss"] == pytest.approx(m1["final_train_loss"], abs=1e-4)
    log3 = pd.read_csv(tmp_path / "resumed" / "log.tsv", sep="\t")
    assert log3["step"].tolist() == list(range(32))


def test_nccl_without_cuda_is_refused_before_anything_starts(tmp_path):
    write_tokens(tmp_path / "tokens")
    result = _train(tmp_path, "bad", 2, backend="nccl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.backend: nccl needs CUDA devices, but training runs on cpu; use gloo"
    ]
