"""End to end on real dvc: train + evaluate outputs and metrics, experiments, branches, kill-and-resume."""

from __future__ import annotations

import json

import pytest
from conftest import merge
from builders import kill_when_checkpoint_appears

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

DATA_STAGES = ("corpus", "tokenizer", "tokenize")
EVAL_KEYS = {"val_loss", "val_ppl", "val_bpb", "n_params", "train_tokens", "tokens_per_param", "tokens_per_sec",
             "device"}


def read_json(project, rel):
    return json.loads((project.path / rel).read_text())


def test_repro_trains_evaluates_and_reports_every_metric(dvc_project):
    p = dvc_project.path
    for rel in ("models/model.pt", "reports/figures/loss_curve.png",
                "reports/samples.md", "reports/train_log.tsv", "reports/val_log.tsv"):
        assert (p / rel).exists(), rel
    shown = json.loads(dvc_project.dvc("metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["reports/eval.json"]["data"]
    assert EVAL_KEYS <= set(metrics)
    assert metrics["device"] == "cpu"
    assert 0 < metrics["val_loss"] < 8 and metrics["val_bpb"] > 0
    samples = (p / "reports/samples.md").read_text()
    assert samples.count("```python") == 3


def test_an_experiment_on_model_params_reruns_train_onwards_but_not_the_data_stages(dvc_project):
    """Also the end-to-end run of a non-default PE variant (the study's complex-valued sketch) through the stages
    that run the model."""
    targets = ("evaluate", "attention_stats", "interventions", "position_analysis")
    result = dvc_project.dvc("exp", "run", "--temp", "-n", "complex-pe", "-S", "model.d_model=48",
                             "-S", "model.n_heads=4", "-S", "model.pe=complex", *targets)
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    for stage in ("train", *targets):
        assert f"Running stage '{stage}'" in result.stdout, stage
    table = json.loads(dvc_project.dvc("exp", "show", "--json").stdout)
    experiments = [exp for row in table for exp in (row.get("experiments") or [])]
    assert "complex-pe" in [exp.get("name") for exp in experiments]
    [ours] = [exp for exp in experiments if exp.get("name") == "complex-pe"]
    metrics = ours["revs"][0]["data"]["metrics"]["reports/eval.json"]["data"]
    assert metrics["val_loss"] > 0


def test_branches_with_different_params_show_a_val_loss_change_in_metrics_diff(dvc_project):
    run = dvc_project.run
    run(["git", "add", "-A"])
    run(["git", "commit", "-q", "-m", "results of the tiny run"])
    base = run(["git", "rev-parse", "--abbrev-ref", "HEAD"]).stdout.strip()
    run(["git", "checkout", "-q", "-b", "higher-lr"])
    try:
        dvc_project.write_params(merge(dvc_project.read_params(), {"train": {"lr": 0.01}}))
        dvc_project.dvc("repro", "evaluate")  # what metrics diff compares; the stages after it stay stale here
        run(["git", "add", "-A"])
        run(["git", "commit", "-q", "-m", "lr 0.01"])
        diff = json.loads(dvc_project.dvc("metrics", "diff", base, "higher-lr", "--json").stdout)
        assert "val_loss" in diff["reports/eval.json"]
        change = diff["reports/eval.json"]["val_loss"]
        assert change["old"] != change["new"]
    finally:
        run(["git", "checkout", "-q", base])
        dvc_project.dvc("checkout", "--force")
    assert not dvc_project.stale_stages()


# What `dvc checkout` cannot bring back after a rerun of train: the lock file and the train outputs dvc does not
# cache. The kill-and-resume test keeps them aside and restores the shared project's finished run afterwards,
# rather than re-running every stage after train.
UNCACHED_TRAIN_STATE = ("dvc.lock", "reports/train.json", "reports/train_log.tsv", "reports/val_log.tsv")


def test_a_killed_train_stage_resumes_under_dvc_repro_and_matches_the_uninterrupted_run(dvc_project):
    p = dvc_project.path
    kept = {rel: (p / rel).read_bytes() for rel in UNCACHED_TRAIN_STATE}
    try:
        killed_and_resumed(dvc_project)
    finally:
        for rel, content in kept.items():
            (p / rel).write_bytes(content)
        dvc_project.run(["git", "add", "dvc.lock"])  # dvc's autostage staged the resumed run's lock file
        dvc_project.dvc("checkout", "--force")
    assert not dvc_project.stale_stages()
    assert dvc_project.run(["git", "diff", "--quiet", "dvc.lock"], check=False).returncode == 0  # index = file


def killed_and_resumed(dvc_project) -> None:
    p = dvc_project.path
    reference = read_json(dvc_project, "reports/train.json")
    steps = reference["steps"]
    every = max(1, round(0.1 * steps))  # train.checkpoint_every_frac = 0.1
    assert steps >= 5 * every  # the first checkpoint comes well before the end, so the kill lands mid-run
    # dvc and the stage's python under it SIGKILLed from outside once the first checkpoint is on disk
    killed = kill_when_checkpoint_appears([*dvc_project.dvc_cmd, "repro", "--force", "--single-item", "train"],
                                          p / "models/checkpoints/ckpt.pt", cwd=p, env=dvc_project.env, timeout=900)
    assert killed.returncode == -9, killed.stderr
    assert (p / "models/checkpoints/ckpt.pt").exists()
    assert not (p / "models/model.pt").exists()

    resumed = dvc_project.dvc("repro", "train")
    assert "Running stage 'train'" in resumed.stdout
    assert "resuming from checkpoint at step" in resumed.stderr + resumed.stdout
    result = read_json(dvc_project, "reports/train.json")
    assert 0 < result["resumed_from_step"] < steps and result["resumed_from_step"] % every == 0
    for key in ("final_train_loss", "final_val_loss", "n_params", "train_tokens"):
        assert result[key] == pytest.approx(reference[key], abs=1e-4), key
    steps_logged = [int(line.split("\t")[0]) for line in (p / "reports/train_log.tsv").read_text().splitlines()[1:]]
    assert steps_logged == list(range(steps))


def exp_metrics(project, name: str, path: str) -> dict:
    table = json.loads(project.dvc("exp", "show", "--json").stdout)
    [exp] = [e for row in table for e in (row.get("experiments") or []) if e.get("name") == name]
    return exp["revs"][0]["data"]["metrics"][path]["data"]


def test_a_code_edit_retrains_from_step_zero_and_never_republishes_the_old_model(dvc_project):
    """The finished run's checkpoint is in the persistent checkpoints folder; a rerun after an edit of the
    model's code trains anew (exp run --temp: the workspace, its checkpoint included, stays as it is)."""
    reference = read_json(dvc_project, "reports/train.json")
    module = dvc_project.path / "src/attnlab/model/transformer.py"
    original = module.read_text()
    line = "        return self.down(F.gelu(self.up(x)))  # (B, T, D)"
    assert line in original
    try:
        module.write_text(original.replace(line, line.replace("F.gelu(", "F.gelu(2.0 * ")))  # changes behaviour
        result = dvc_project.dvc("exp", "run", "--temp", "-n", "gelu-edit", "train")
    finally:
        module.write_text(original)
    assert "Running stage 'train'" in result.stdout
    edited = exp_metrics(dvc_project, "gelu-edit", "reports/train.json")
    assert edited["resumed_from_step"] == 0 and edited["tokens_per_sec"] > 0
    assert edited["final_train_loss"] != reference["final_train_loss"]  # another model, not the old one again
    assert not dvc_project.stale_stages()


def test_loss_by_position_agrees_with_val_loss_and_reaches_twice_the_trained_length(dvc_project):
    p = dvc_project.path
    metrics = read_json(dvc_project, "reports/eval.json")
    curves = read_json(dvc_project, "reports/loss_by_position.json")
    seq_len = dvc_project.read_params()["model"]["seq_len"]
    assert curves["position"] == list(range(seq_len)) and len(curves["loss"]) == len(curves["tokens"]) == seq_len
    mean = sum(l * n for l, n in zip(curves["loss"], curves["tokens"])) / sum(curves["tokens"])
    assert mean == pytest.approx(metrics["val_loss"], abs=1e-5)
    assert sum(curves["tokens"]) == metrics["val_tokens_scored"]
    assert len(curves["loss_2x"]) == len(curves["tokens_2x"]) == 2 * seq_len  # rope: positions extend
    assert len(curves["loss_4x"]) == len(curves["tokens_4x"]) == 4 * seq_len
    assert curves["context_length"] == [seq_len, 2 * seq_len, 4 * seq_len]  # eval.context_multiples
    assert curves["paired_loss"] == [metrics[f"val_loss_at_{m}x_seq_len"] for m in (1, 2, 4)]
    assert metrics["paired_tokens_scored"] == curves["paired_tokens"] == sum(curves["tokens_2x"]) // 2
    assert (p / "reports/figures/loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
