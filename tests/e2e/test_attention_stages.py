"""The attention_stats, figure and report stages run as real subprocesses on a tiny project in a tmp folder:
a SentencePiece tokenizer trained here, token files written per the data contract, a random-init model saved
with attnlab.checkpoint.save_model."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from attnlab.core.params import ModelConfig
from attnlab.model.checkpoint import load_model, save_model
from attnlab.model.transformer import Transformer
from attnlab.report.figures import FIGURES
from attnlab.model.snapshots import save_snapshot

pytestmark = pytest.mark.xdist_group("attention_stages")

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
N_EXAMPLES = 6
NASTY = 'html = "</script><b>&amp; \'q\'"'  # source text that must come out escaped

SOURCE = (
    "import torch\n\n\ndef forward(self, x):\n    return self.proj(x) + 1\n\n"
    "class Block:\n    def __init__(self, d_model, n_heads):\n        self.n_heads = n_heads\n"
    "        if d_model < 0 and n_heads > 0:\n            raise ValueError('bad')\n"
)
TEXT = SOURCE + (NASTY + "\n") * 8  # every window of SEQ_LEN tokens holds NASTY whole


def run_stage(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def write_params(project: Path, **attention) -> None:
    params = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": SEQ_LEN},
        "attention": {"n_examples": N_EXAMPLES, "batch_size": 4, "seq_len_filter": [8, 24], **attention},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def build_project(root: Path) -> Path:
    import sentencepiece as spm

    project = root / "project"
    (project / "data" / "tokenizer").mkdir(parents=True)
    (project / "data" / "tokens").mkdir(parents=True)
    (project / "models").mkdir()
    corpus = project / "corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(project / "data" / "tokenizer" / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",  # keep newlines and runs of spaces, as source code needs
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(project / "data" / "tokenizer" / "tokenizer.model"))
    eos = sp.eos_id()
    meta = {"vocab_size": sp.get_piece_size(), "eos_id": eos}
    for split, repeats in (("train", 30), ("val", 12)):
        ids = []
        for _ in range(repeats):
            ids += sp.encode(TEXT) + [eos]
        np.asarray(ids, dtype=np.uint16).tofile(project / "data" / "tokens" / f"{split}.bin")
        meta[split] = {"tokens": len(ids), "bytes": len(TEXT) * repeats, "files": repeats}
    meta["bytes_per_token"] = {s: meta[s]["bytes"] / meta[s]["tokens"] for s in ("train", "val")}
    (project / "data" / "tokens" / "meta.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=SEQ_LEN)
    save_model(project / "models" / "model.pt", Transformer(cfg, sp.get_piece_size()))
    write_params(project)
    return project


STATS_ARGS = [
    "--params", "params.yaml", "--model", "models/model.pt", "--tokens", "data/tokens",
    "--out", "data/attention", "--metrics", "reports/attention.json",
]  # fmt: skip


DYNAMICS_ARGS = [
    "--params", "params.yaml", "--snapshots", "models/snapshots", "--tokens", "data/tokens", "--reference",
    "reports/attention.json", "--out", "data/attention/dynamics.parquet", "--metrics", "reports/attention_dynamics.json",
]  # fmt: skip


ROLES_ARGS = [
    "--params", "params.yaml", "--model", "models/model.pt", "--tokens", "data/tokens",
    "--out", "data/attention/head_roles.parquet", "--metrics", "reports/head_roles.json",
]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = build_project(tmp_path_factory.mktemp("attention"))
    result = run_stage("attention_stats.py", *STATS_ARGS, cwd=project)
    assert result.returncode == 0, result.stderr
    assert "attention_stats:" in result.stdout
    model, _ = load_model(project / "models" / "model.pt")
    for step in (1, 2):  # two snapshots of the same weights, for attention_dynamics (one figure reads it)
        save_snapshot(project / "models" / "snapshots", model, step, step * 4 * SEQ_LEN)
    result = run_stage("attention_dynamics.py", *DYNAMICS_ARGS, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("attention_dynamics: 2 snapshots")
    roles = run_stage("head_roles.py", *ROLES_ARGS, cwd=project)  # head_roles.png reads its table
    assert roles.returncode == 0, roles.stderr
    return project


def figure_args(name: str) -> list[str]:
    args = ["--params", "params.yaml", "--name", name, "--attention", "data/attention", "--out", f"reports/figures/{name}"]
    if name == "attn_tokens.html":
        args += ["--model", "models/model.pt", "--tokenizer", "data/tokenizer/tokenizer.model"]
    return args


@pytest.fixture(scope="module")
def figures(project) -> Path:
    for name in FIGURES:
        result = run_stage("figure.py", *figure_args(name), cwd=project)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    return project / "reports" / "figures"


# ------------------------------------------------------------------------------------------ attention_stats


def test_stats_parquet_schema_dtypes_and_bounds(project):
    table = pq.read_table(project / "data" / "attention" / "stats.parquet")
    types = {field.name: str(field.type) for field in table.schema}
    assert types == {
        "split": "dictionary<values=string, indices=int8, ordered=0>",
        "example": "int16",
        "layer": "int8",
        "head": "int8",
        "position": "int16",
        "entropy_bits": "float",
        "support": "float",
        "normalized_support": "float",
        "max_weight": "float",
        "mean_distance": "float",
        "weight_on_first": "float",
    }
    df = table.to_pandas()
    assert str(df["split"].dtype) == "category"
    assert len(df) == 2 * N_EXAMPLES * 2 * 4 * SEQ_LEN
    assert set(df["split"]) == {"train", "val"}
    position = df["position"].to_numpy().astype(np.float64)
    assert (df["entropy_bits"] >= 0).all()
    assert (df["entropy_bits"] <= np.log2(position + 1) + 1e-6).all()
    np.testing.assert_allclose(df["support"], np.exp2(df["entropy_bits"]), rtol=1e-6)
    np.testing.assert_allclose(df["normalized_support"], df["support"] / (position + 1), rtol=1e-6)
    assert np.isfinite(df.select_dtypes("float32").to_numpy()).all()


def test_metrics_json_and_side_files(project):
    metrics = json.loads((project / "reports" / "attention.json").read_text())
    assert set(metrics) == {"train", "val", "seconds"} and metrics["seconds"] > 0
    for split in ("train", "val"):
        assert set(metrics[split]) - {"heads"} == {"mean_entropy_bits", "mean_support", "mean_normalized_support"}
        assert 0 < metrics[split]["mean_entropy_bits"] <= np.log2(SEQ_LEN)
        assert 1 <= metrics[split]["mean_support"] <= SEQ_LEN
    heads = metrics["val"]["heads"]  # per-head means of the val split (2 layers x 4 heads)
    assert list(heads) == [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
    assert all(set(h) == {"mean_support", "mean_normalized_support"} for h in heads.values())
    assert np.mean([h["mean_support"] for h in heads.values()]) == pytest.approx(metrics["val"]["mean_support"])
    patterns = np.load(project / "data" / "attention" / "mean_patterns.npy")
    assert patterns.shape == (2, 4, SEQ_LEN, SEQ_LEN) and patterns.dtype == np.float32
    np.testing.assert_allclose(np.nansum(patterns, -1), 1.0, rtol=1e-5)
    with np.load(project / "data" / "attention" / "examples.npz") as data:
        assert data["tokens"].shape == (2, N_EXAMPLES, SEQ_LEN)


def test_stats_are_seeded_and_reproducible(project, tmp_path):
    result = run_stage("attention_stats.py", *STATS_ARGS[:-4], "--out", str(tmp_path / "a"),
                       "--metrics", str(tmp_path / "a.json"), cwd=project)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = pq.read_table(project / "data" / "attention" / "stats.parquet")
    again = pq.read_table(tmp_path / "a" / "stats.parquet")
    assert first.equals(again)


def test_the_training_seed_leaves_the_examples_unchanged_the_analysis_seed_moves_them(project, tmp_path):
    """Seeds vary the model, not the measurement: examples.npz depends on analysis.seed, not on `seed`."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    examples = {}
    for name, change in (("seed", {"seed": params.get("seed", 1337) + 1}), ("analysis", {"analysis": {"seed": 5}})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**params, **change}))
        result = run_stage("attention_stats.py", "--params", str(tmp_path / f"{name}.yaml"), *STATS_ARGS[2:6],
                           "--out", str(tmp_path / name), "--metrics", str(tmp_path / f"{name}.json"), cwd=project)
        assert result.returncode == 0, result.stderr
        with np.load(tmp_path / name / "examples.npz") as data:
            examples[name] = data["tokens"]
    with np.load(project / "data" / "attention" / "examples.npz") as data:
        ours = data["tokens"]
    assert np.array_equal(examples["seed"], ours)
    assert not np.array_equal(examples["analysis"], ours)


def test_stats_stage_bad_input_is_one_error_line(project, tmp_path):
    result = run_stage("attention_stats.py", *STATS_ARGS[:2], "--model", str(tmp_path / "missing.pt"),
                       *STATS_ARGS[4:6], "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                       cwd=project)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing.pt" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ figures


@pytest.mark.parametrize("name", [n for n in FIGURES if n.endswith(".png")])
def test_each_figure_is_a_valid_png_of_sensible_size(figures, name):
    data = (figures / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 400 <= width <= 3000 and 300 <= height <= 3000, (width, height)
    assert len(data) > 10_000


def test_figures_are_deterministic(project, figures, tmp_path):
    name = "attn_support_vs_seq_len.png"
    args = figure_args(name)
    args[-1] = str(tmp_path / name)
    assert run_stage("figure.py", *args, cwd=project).returncode == 0
    assert (tmp_path / name).read_bytes() == (figures / name).read_bytes()


def test_token_view_escapes_source(figures):
    page = (figures / "attn_tokens.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<b>" not in page and "</script" not in page.lower() and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page  # offline
    text = html.unescape(re.sub(r"<[^>]+>", "", page))  # what a browser shows
    assert NASTY in text
    assert len(re.findall(r'<div class="panel">', page)) == 4  # most + least support, per split


def test_seq_len_filter_beyond_model_file_is_config_error(project, tmp_path):
    # params.yaml says model.seq_len=64 (so load_params accepts the filter) but the model file has 32
    bad = tmp_path / "params.yaml"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["seq_len"] = 64
    params["attention"]["seq_len_filter"] = [16, 48]
    bad.write_text(yaml.safe_dump(params))
    name = "attn_support_hist_by_block_head_w_seq_len_filter.png"
    args = figure_args(name)
    args[1], args[-1] = str(bad), str(tmp_path / name)
    result = run_stage("figure.py", *args, cwd=project)
    assert result.returncode == 2
    assert result.stderr.startswith("error: attention.seq_len_filter:") and f"seq_len={SEQ_LEN}" in result.stderr
    assert not (tmp_path / name).exists()


def test_token_view_head_beyond_model_file_is_config_error(project, tmp_path):
    bad = tmp_path / "params.yaml"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["n_heads"] = 8
    params["attention"]["token_view_head"] = 6
    bad.write_text(yaml.safe_dump(params))
    args = figure_args("attn_tokens.html")
    args[1], args[7] = str(bad), str(tmp_path / "t.html")
    result = run_stage("figure.py", *args, cwd=project)
    assert result.returncode == 2
    assert result.stderr.startswith("error: attention.token_view_head:") and "4 heads" in result.stderr


def test_unknown_figure_name_is_config_error(project, tmp_path):
    args = figure_args("nope.png")
    args[-1] = str(tmp_path / "nope.png")
    result = run_stage("figure.py", *args, cwd=project)
    assert result.returncode == 2 and result.stderr.startswith("error: --name:")


# ------------------------------------------------------------------------------------------------- report


def test_report_page_embeds_every_figure(project, figures):
    result = run_stage("report.py", "--reports", "reports", "--out", "reports/index.html", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "samples.md" in result.stdout  # train/eval outputs absent here
    page = (project / "reports" / "index.html").read_text()
    for name in FIGURES:
        assert name in page
    assert page.count("data:image/png;base64,") == sum(n.endswith(".png") for n in FIGURES)
    assert "<iframe" in page and "srcdoc=" in page  # the token view, embedded
    assert "mean_normalized_support" in page  # attention metrics table
    assert "not produced in this run" in page  # missing inputs are noted, not fatal
    assert 'src="http' not in page and 'href="http' not in page
