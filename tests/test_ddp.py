"""Data-parallel training under a real `torchrun --nproc_per_node 2` (gloo on CPU)."""

import json

import pandas as pd
import pytest

from helpers import TINY_TRAIN_PARAMS, run_stage, write_params, write_tokens


def _train(tmp_path, name, nproc, env=None, backend="auto"):
    overrides = json.loads(json.dumps(TINY_TRAIN_PARAMS))
    overrides["train"].update({"nproc_per_node": nproc, "backend": backend})
    write_params(tmp_path / f"{name}.yaml", overrides)
    args = ["--params", f"{name}.yaml", "--tokens", "tokens", "--model", f"{name}/model.pt",
            "--checkpoints", "shared-checkpoints", "--metrics", f"{name}/train.json",
            "--step-log", f"{name}/log.tsv", "--val-log", f"{name}/val.tsv", "--figure", f"{name}/loss.png"]
    return run_stage("train.py", *args, cwd=tmp_path, env=env)


@pytest.mark.slow
def test_two_processes_follow_the_same_loss_curve_as_one_with_the_same_global_batch(tmp_path):
    write_tokens(tmp_path / "tokens")
    one = _train(tmp_path, "one", 1)
    assert one.returncode == 0, one.stderr
    (tmp_path / "shared-checkpoints" / "ckpt.pt").unlink()  # make the 2-process run start from scratch
    two = _train(tmp_path, "two", 2)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stderr
    log1 = pd.read_csv(tmp_path / "one" / "log.tsv", sep="\t")
    log2 = pd.read_csv(tmp_path / "two" / "log.tsv", sep="\t")
    assert log1["step"].tolist() == log2["step"].tolist()
    assert log2["loss"].to_numpy() == pytest.approx(log1["loss"].to_numpy(), abs=1e-4)
    m1 = json.loads((tmp_path / "one" / "train.json").read_text())
    m2 = json.loads((tmp_path / "two" / "train.json").read_text())
    assert m2["world_size"] == 2
    assert m2["final_val_loss"] == pytest.approx(m1["final_val_loss"], abs=1e-4)


@pytest.mark.slow
def test_a_two_process_run_killed_halfway_resumes_under_one_process(tmp_path):
    write_tokens(tmp_path / "tokens")
    killed = _train(tmp_path, "a", 2, env={"ATTNLAB_KILL_AT_STEP": "20"})
    assert killed.returncode != 0
    resumed = _train(tmp_path, "a", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint at step 18/32" in resumed.stderr
    (tmp_path / "shared-checkpoints" / "ckpt.pt").unlink()
    full = _train(tmp_path, "full", 1)
    assert full.returncode == 0, full.stderr
    resumed_m = json.loads((tmp_path / "a" / "train.json").read_text())
    full_m = json.loads((tmp_path / "full" / "train.json").read_text())
    assert resumed_m["final_train_loss"] == pytest.approx(full_m["final_train_loss"], abs=1e-4)
    log = pd.read_csv(tmp_path / "a" / "log.tsv", sep="\t")
    assert log["step"].tolist() == list(range(32))


def test_nccl_without_cuda_is_refused_before_anything_starts(tmp_path):
    write_tokens(tmp_path / "tokens")
    result = _train(tmp_path, "bad", 2, backend="nccl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.backend: nccl needs CUDA devices, but training runs on cpu; use gloo"
    ]
