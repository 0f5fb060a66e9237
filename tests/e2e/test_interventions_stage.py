"""The interventions stage as a real subprocess on a tmp folder: a random-init model (save_model), token files
written per the data contract, a tiny SentencePiece model; and bad params through `python -m attnlab.config`
and through the stage script (exit 2, one `error:` line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from builders import train_sentencepiece, training_text, write_model, write_tokens_from_text

from attnlab.analysis.capture import explicit_attention
from attnlab.analysis.evaluate import samples_markdown as evaluate_samples
from attnlab.analysis.generate import generate
from attnlab.analysis.intervention_sweep import intervention_starts, make_batches
from attnlab.analysis.interventions import MeanAblate, mean_head_outputs, score_intervened
from attnlab.data.tokens import example_starts, load_tokens
from attnlab.model.checkpoint import load_model
from attnlab.report.plots_interventions import INTERVENTION_FIGURES, write_intervention_figures

pytestmark = pytest.mark.xdist_group("interventions_stage")  # one worker builds the tmp folder and runs the stage once

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / "stages" / "interventions.py"
SEQ_LEN, N_LAYERS, N_HEADS = 24, 2, 4
TEMPERATURES, TOP_K = [0.25, 1.0, 4.0], [1, 2, 64]
PROMPTS = ["import torch\n", "def f(x):\n"]


def write_params(path: Path, **interventions) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(d_model=32, n_layers=N_LAYERS, n_heads=N_HEADS, d_ff=64, seq_len=SEQ_LEN)
    params["attention"]["seq_len_filter"] = [4, 12]
    params["eval"].update(prompts=PROMPTS, sample_temperature=0.8, sample_top_k=20)
    params["interventions"] = dict(
        n_eval_tokens=10 * SEQ_LEN, mean_tokens=12 * SEQ_LEN, batch_size=4, temperatures=TEMPERATURES,
        top_k=TOP_K, sample_tokens=8,
    )  # fmt: skip
    for key, value in interventions.items():
        if key.startswith("model_"):
            params["model"][key[len("model_") :]] = value
        else:
            params["interventions"][key] = value
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interventions")
    sp = train_sentencepiece(root / "data" / "tokenizer" / "tokenizer.model")
    write_tokens_from_text(root / "data" / "tokens", sp, training_text())
    write_model(root / "models" / "model.pt", sp.get_piece_size(), seq_len=SEQ_LEN, n_layers=N_LAYERS, n_heads=N_HEADS)
    write_params(root / "params.yaml")
    return root


def stage_cmd(root: Path, params: Path) -> list[str]:
    return [
        sys.executable, str(STAGE), "--params", str(params), "--model", str(root / "models/model.pt"),
        "--tokens", str(root / "data/tokens"), "--tokenizer", str(root / "data/tokenizer/tokenizer.model"),
        "--metrics", str(root / "reports/interventions.json"),
        "--table", str(root / "data/interventions/results.parquet"),
        "--figures", str(root / "reports/figures"), "--samples", str(root / "reports/intervention_samples.md"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage_run(workdir):
    proc = subprocess.run(stage_cmd(workdir, workdir / "params.yaml"), capture_output=True, text=True, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_metrics_have_the_nested_layout(workdir, stage_run):
    metrics = json.loads((workdir / "reports/interventions.json").read_text())
    assert list(metrics) == ["baseline", "uniform_all", "uniform_layer", "temperature", "top_k", "mean_ablate",
                             "tokens_scored", "seconds"]
    assert metrics["seconds"] > 0  # the stage's time: the one key that differs between two runs
    assert metrics["tokens_scored"] == {"val": 10 * SEQ_LEN, "train_for_means": 12 * SEQ_LEN}
    summary = {"loss", "ppl", "mean_entropy_bits"}
    assert set(metrics["baseline"]) == summary and set(metrics["uniform_all"]) == summary
    assert list(metrics["uniform_layer"]) == ["0", "1"]
    assert list(metrics["temperature"]) == ["0.25", "1.0", "4.0"]
    assert list(metrics["top_k"]) == ["1", "2", "64"]
    assert all(set(v) == summary for key in ("uniform_layer", "temperature", "top_k") for v in metrics[key].values())
    assert list(metrics["mean_ablate"]) == [f"L{layer}H{head}" for layer in range(N_LAYERS) for head in range(N_HEADS)]
    assert all(set(v) == {"loss", "delta", "delta_low", "delta_high"} for v in metrics["mean_ablate"].values())
    assert all(v["delta_low"] <= v["delta_high"] for v in metrics["mean_ablate"].values())
    assert stage_run.stdout.strip().splitlines()[-1].startswith("interventions: 18 rows x 240 val tokens")


def test_identity_rows_reproduce_the_baseline(workdir, stage_run):
    metrics = json.loads((workdir / "reports/interventions.json").read_text())
    base = metrics["baseline"]
    for row in (metrics["temperature"]["1.0"], metrics["top_k"]["64"]):  # tau = 1 and k >= seq_len
        assert row["loss"] == pytest.approx(base["loss"], abs=1e-6)
        assert row["mean_entropy_bits"] == pytest.approx(base["mean_entropy_bits"], abs=1e-6)
    assert metrics["top_k"]["1"]["mean_entropy_bits"] == 0.0  # one-hot rows
    uniform_bits = np.mean(np.log2(np.arange(1, SEQ_LEN + 1)))  # row t spreads over t + 1 keys
    assert metrics["uniform_all"]["mean_entropy_bits"] == pytest.approx(uniform_bits, abs=1e-6)
    assert base["ppl"] == pytest.approx(np.exp(base["loss"]))


def seed_of(workdir: Path) -> int:
    return int(yaml.safe_load((workdir / "params.yaml").read_text())["analysis"]["seed"])


def test_windows_are_seeded_random_windows_from_the_whole_split(workdir):
    """The windows attention_stats would pick (example_starts with the run's seed), not the split's first ones."""
    val = load_tokens(workdir / "data/tokens", "val")
    starts = intervention_starts(val, SEQ_LEN, 10 * SEQ_LEN, seed_of(workdir))
    assert np.array_equal(starts, example_starts(len(val), SEQ_LEN, 10, seed_of(workdir)))
    first_windows = np.arange(10) * SEQ_LEN
    assert not np.array_equal(np.sort(starts), first_windows)
    assert starts.max() > len(val) // 2  # reaches the second half of the split
    assert not np.array_equal(starts, intervention_starts(val, SEQ_LEN, 10 * SEQ_LEN, seed_of(workdir) + 1))


def test_the_training_seed_leaves_the_windows_and_every_number_unchanged(workdir, stage_run, tmp_path):
    """Seeds vary the model, not the measurement: the same model under another `seed` scores the same windows."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["seed"] += 1
    other = tmp_path / "params.yaml"
    other.write_text(yaml.safe_dump(params))
    cmd = stage_cmd(workdir, other)
    for flag, name in (("--metrics", "interventions.json"), ("--table", "results.parquet"),
                       ("--figures", "figures"), ("--samples", "intervention_samples.md")):
        cmd[cmd.index(flag) + 1] = str(tmp_path / name)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads((workdir / "reports/interventions.json").read_text())
    theirs = json.loads((tmp_path / "interventions.json").read_text())
    assert theirs.pop("seconds") > 0 and ours.pop("seconds") > 0  # timing, not a measurement
    assert theirs == ours
    assert (tmp_path / "intervention_samples.md").read_text() == (workdir / "reports/intervention_samples.md").read_text()


def test_baseline_is_the_loss_on_the_seeded_val_windows(workdir, stage_run):
    """An independent loop: plain forward (fused path) over the seeded random val windows."""
    model, _ = load_model(workdir / "models/model.pt")
    val = load_tokens(workdir / "data/tokens", "val")
    starts = example_starts(len(val), SEQ_LEN, 10, seed_of(workdir))
    assert len(starts) == 10
    losses = []
    with torch.no_grad():
        for start in starts:
            window = torch.from_numpy(val[start : start + SEQ_LEN + 1].astype(np.int64))
            losses.append(torch.nn.functional.cross_entropy(model(window[None, :-1])[0], window[1:]).item())
    metrics = json.loads((workdir / "reports/interventions.json").read_text())
    assert metrics["baseline"]["loss"] == pytest.approx(np.mean(losses), abs=1e-5)


def test_mean_ablation_uses_means_from_the_train_split(workdir, stage_run):
    model, _ = load_model(workdir / "models/model.pt")
    tokens = workdir / "data/tokens"
    val = load_tokens(tokens, "val")
    batches = {
        split: make_batches(data, example_starts(len(data), SEQ_LEN, n // SEQ_LEN, seed_of(workdir)), SEQ_LEN, 4, "cpu")
        for split, data, n in (("train", load_tokens(tokens, "train"), 12 * SEQ_LEN), ("val", val, 10 * SEQ_LEN))
    }
    metrics = json.loads((workdir / "reports/interventions.json").read_text())
    for split, should_match in (("train", True), ("val", False)):
        means = mean_head_outputs(model, batches[split])
        loss = score_intervened(model, batches["val"], {(1, 2): MeanAblate(means)}).loss
        assert (loss == pytest.approx(metrics["mean_ablate"]["L1H2"]["loss"], abs=1e-6)) is should_match, split


def test_results_table_has_every_row(workdir, stage_run):
    table = pd.read_parquet(workdir / "data/interventions/results.parquet")
    assert list(table.columns) == ["kind", "setting", "layer", "head", "loss", "ppl", "mean_entropy_bits", "delta",
                                   "delta_low", "delta_high"]
    assert table["kind"].value_counts().to_dict() == {
        "baseline": 1, "uniform_all": 1, "uniform_layer": 2, "temperature": 3, "top_k": 3, "mean_ablate": 8,
    }  # fmt: skip
    baseline = table.loc[table.kind == "baseline", "loss"].item()
    np.testing.assert_allclose(table["delta"], table["loss"] - baseline)
    ablate = table[table.kind == "mean_ablate"]
    assert ablate[["layer", "head"]].astype(int).values.tolist() == [[la, h] for la in range(2) for h in range(4)]
    assert np.isfinite(table[["loss", "ppl", "mean_entropy_bits"]].to_numpy()).all()


def test_figures_are_written_and_deterministic(workdir, stage_run, tmp_path):
    names = [name for name, _ in INTERVENTION_FIGURES]
    assert sorted(names) == sorted(
        ["intervention_temperature.png", "intervention_top_k.png", "head_importance.png", "intervention_uniform.png"]
    )
    assert all(caption.strip() and "\n" not in caption for _, caption in INTERVENTION_FIGURES)
    for name in names:
        data = (workdir / "reports/figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    table = pd.read_parquet(workdir / "data/interventions/results.parquet")
    write_intervention_figures(table, tmp_path, SEQ_LEN)
    for name in names:
        assert (tmp_path / name).read_bytes() == (workdir / "reports/figures" / name).read_bytes(), name
    leftovers = [p for p in workdir.rglob("*.tmp")]
    assert not leftovers


def test_samples_use_the_same_prompts_and_seed(workdir, stage_run):
    text = (workdir / "reports/intervention_samples.md").read_text()
    titles = ["## baseline", "## all heads uniform", "## all heads temperature 0.25", "## all heads top-1"]
    positions = [text.index(title) for title in titles]
    assert positions == sorted(positions)
    sections = [text[a:b] for a, b in zip(positions, positions[1:] + [len(text)])]
    for section in sections:
        assert section.count("Prompt 1:") == 1 and section.count("Prompt 2:") == 1
    model, _ = load_model(workdir / "models/model.pt")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(workdir / "data/tokenizer/tokenizer.model"))
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    with explicit_attention(model):
        for i, prompt in enumerate(PROMPTS):
            sample = generate(model, sp, prompt, 8, 0.8, 20, params["analysis"]["seed"] + i)
            assert f"```python\n{sample}\n```" in sections[0]


def test_baseline_samples_are_evaluates_samples(workdir, stage_run):
    """samples.md (evaluate) and the interventions' baseline continue each prompt with the same seed: with the
    same number of tokens they are the same text."""
    import sentencepiece as spm

    from attnlab.core.params import load_params

    model, _ = load_model(workdir / "models/model.pt")
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "data/tokenizer/tokenizer.model"))
    params = load_params(workdir / "params.yaml")
    params = params.__class__(**{**params.__dict__, "eval": params.eval.__class__(
        **{**params.eval.__dict__, "sample_tokens": params.interventions.sample_tokens})})
    evaluate_md = evaluate_samples(model, sp, params)
    baseline = (workdir / "reports/intervention_samples.md").read_text().split("## all heads uniform")[0]
    blocks = [b.split("```", 1)[0] for b in baseline.split("```python\n")[1:]]
    assert len(blocks) == len(PROMPTS)
    for block in blocks:
        assert f"```python\n{block.rstrip(chr(10))}\n```" in evaluate_md


# ------------------------------------------------------------------------------------------- bad params

BAD = [
    ({"temperatures": [0.0]}, "interventions.temperatures"),
    ({"temperatures": [1.0, -2.0]}, "interventions.temperatures"),
    ({"temperatures": []}, "interventions.temperatures"),
    ({"top_k": [4, 0]}, "interventions.top_k"),
    ({"top_k": []}, "interventions.top_k"),
    ({"n_eval_tokens": SEQ_LEN - 1}, "interventions.n_eval_tokens"),
]


def one_error_line(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), proc.stderr


@pytest.mark.parametrize("change, key", BAD, ids=[key + str(i) for i, (_, key) in enumerate(BAD)])
def test_bad_params_through_the_config_cli(tmp_path, change, key):
    params = write_params(tmp_path / "params.yaml", **change)
    proc = subprocess.run([sys.executable, "-m", "attnlab.config", str(params)], capture_output=True, text=True)
    one_error_line(proc, key)


@pytest.mark.parametrize(
    "change, key",
    [
        BAD[0],
        BAD[3],
        BAD[5],
        # passes the params check (model.seq_len 16) but is below the checkpoint's seq_len of 24
        ({"n_eval_tokens": 20, "model_seq_len": 16}, "interventions.n_eval_tokens"),
    ],
    ids=["tau", "k", "n_eval_tokens", "n_eval_tokens_vs_checkpoint"],
)
def test_bad_params_through_the_stage(workdir, tmp_path, change, key):
    root = tmp_path / "run"
    (root / "models").mkdir(parents=True)
    (root / "models/model.pt").symlink_to(workdir / "models/model.pt")
    (root / "data").mkdir()
    for part in ("tokens", "tokenizer"):
        (root / "data" / part).symlink_to(workdir / "data" / part)
    params = write_params(tmp_path / "params.yaml", **change)
    proc = subprocess.run(stage_cmd(root, params), capture_output=True, text=True, cwd=tmp_path)
    one_error_line(proc, key)
    assert not (root / "reports").exists() and not (root / "data/interventions").exists()  # nothing written


def test_a_missing_tokenizer_is_named(workdir, tmp_path):
    cmd = stage_cmd(workdir, workdir / "params.yaml")
    cmd[cmd.index("--tokenizer") + 1] = str(tmp_path / "nope.model")
    cmd[cmd.index("--metrics") + 1] = str(tmp_path / "m.json")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    one_error_line(proc, str(tmp_path / "nope.model"))
