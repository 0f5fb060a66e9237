"""Weight snapshots written by real tiny training runs: one per validation point, kept across a kill and
resume, and those of other params dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from builders import (
    TINY_TRAIN_PARAMS,
    kill_when_checkpoint_appears,
    run_stage,
    stage_command,
    stage_env,
    write_params,
    write_tokens,
)

from attnlab.core.params import load_params
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer
from attnlab.training.loop import TrainPaths, train
from attnlab.model.snapshots import (
    list_snapshots,
    snapshot_meta,
)

STEPS = 32  # TINY_TRAIN_PARAMS: 8192 tokens in steps of 8 x 32
TOKENS_PER_STEP = 8 * 32
EVAL_STEPS = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32]  # every round(0.1 * 32) = 3 steps, and the last


def _paths(root: Path) -> TrainPaths:
    return TrainPaths.under(root, root / "tokens")


def _train_in_process(root: Path, **train_overrides) -> dict:
    overrides = json.loads(json.dumps(TINY_TRAIN_PARAMS))
    overrides["train"].update({"device": "cpu", **train_overrides})
    params = load_params(write_params(root / "params.yaml", overrides))
    return train(params, _paths(root))


def _snapshot_table(folder: Path) -> pd.DataFrame:
    """One row per snapshot: the step of its file name (name_step) and its meta (step, train_tokens, fingerprint)."""
    rows = [{"name_step": step, **snapshot_meta(path)} for step, path in list_snapshots(folder)]
    return pd.DataFrame(rows)


def test_training_writes_one_snapshot_per_validation_point_and_a_fresh_run_drops_stale_ones(tmp_path):
    write_tokens(tmp_path / "tokens")
    metrics = _train_in_process(tmp_path)
    assert metrics["steps"] == STEPS
    table = _snapshot_table(tmp_path / "snapshots")
    val_log = pd.read_csv(tmp_path / "val.tsv", sep="\t")
    assert table["step"].tolist() == [0] + val_log["step"].tolist() == [0] + EVAL_STEPS  # init, then each validation
    assert table["name_step"].equals(table["step"])
    assert table["train_tokens"].tolist() == [0] + val_log["tokens"].tolist() == [s * TOKENS_PER_STEP
                                                                                 for s in [0] + EVAL_STEPS]
    assert table["train_tokens"].is_monotonic_increasing and table["train_tokens"].iloc[-1] == metrics["train_tokens"]
    final, _ = load_model(tmp_path / "model.pt")
    last, _ = load_model(list_snapshots(tmp_path / "snapshots")[-1][1])
    for name, value in last.state_dict().items():  # the last snapshot is the final model, in float16
        torch.testing.assert_close(value, final.state_dict()[name].half().float(), rtol=0, atol=0)
    first, _ = load_model(list_snapshots(tmp_path / "snapshots")[0][1])
    torch.manual_seed(load_params(tmp_path / "params.yaml").seed)  # the train stage's init: seed, then the model
    init = Transformer(first.cfg, first.vocab_size)  # (the stage builds it on the CPU here)
    for name, value in first.state_dict().items():  # the first snapshot is the untrained model, in float16
        torch.testing.assert_close(value, init.state_dict()[name].half().float(), rtol=0, atol=0)

    # other params (a smaller budget: 16 steps, validation every 2): the checkpoint is not resumed, and none of
    # the old run's snapshots survive, not even those at steps the new run never validates at
    metrics = _train_in_process(tmp_path, max_tokens=4096)
    assert metrics["resumed_from_step"] == 0
    table = _snapshot_table(tmp_path / "snapshots")
    assert table["step"].tolist() == list(range(0, 17, 2))
    assert table["fingerprint"].nunique() == 1


def _stage_args(name: str) -> list[str]:
    return ["--params", "params.yaml", "--tokens", "tokens", "--model", f"{name}/model.pt",
            "--checkpoints", f"{name}/checkpoints", "--metrics", f"{name}/train.json", "--step-log",
            f"{name}/log.tsv", "--val-log", f"{name}/val.tsv", "--snapshots", f"{name}/snapshots"]


def test_a_resumed_run_keeps_the_earlier_snapshots_and_ends_with_those_of_an_uninterrupted_run(tmp_path):
    write_tokens(tmp_path / "tokens")
    write_params(tmp_path / "params.yaml", TINY_TRAIN_PARAMS)
    full = run_stage("train.py", *_stage_args("full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    killed = kill_when_checkpoint_appears(stage_command("train.py", *_stage_args("run")),
                                          tmp_path / "run/checkpoints/ckpt.pt", cwd=tmp_path, env=stage_env())
    assert killed.returncode == -9, killed.stderr
    folder = tmp_path / "run" / "snapshots"
    before = {path.name: path.stat().st_mtime_ns for _, path in list_snapshots(folder)}
    assert before, "the first checkpoint comes after the first validation point"
    planted = folder / "step_000031.pt"  # a snapshot from the future of this run: the resumed run recomputes it
    planted.write_bytes(list_snapshots(folder)[-1][1].read_bytes())

    resumed = run_stage("train.py", *_stage_args("run"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    start = json.loads((tmp_path / "run/train.json").read_text())["resumed_from_step"]
    assert 0 < start < STEPS
    assert not planted.exists()
    after = {path.name: path.stat().st_mtime_ns for _, path in list_snapshots(folder)}
    kept = {name for name, step in ((n, int(n[5:11])) for n in before) if step <= start}
    assert kept and all(after[name] == before[name] for name in kept)  # not rewritten
    ours, reference = _snapshot_table(folder), _snapshot_table(tmp_path / "full" / "snapshots")
    assert ours[["step", "train_tokens", "fingerprint"]].equals(reference[["step", "train_tokens", "fingerprint"]])
    assert ours["step"].tolist() == [0] + EVAL_STEPS
    for (_, a), (_, b) in zip(list_snapshots(folder), list_snapshots(tmp_path / "full" / "snapshots")):
        for name, value in load_model(a)[0].state_dict().items():
            torch.testing.assert_close(value, load_model(b)[0].state_dict()[name], rtol=1e-3, atol=1e-3)
