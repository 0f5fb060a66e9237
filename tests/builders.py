"""The builders every test shares: tiny token files and params, a tiny trained-format model, a tiny
SentencePiece model, stage subprocesses, and killing a run from outside once it has checkpointed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil  # a dependency of dvc
import sentencepiece as spm
import torch
import yaml

from attnlab.core.params import ModelConfig
from attnlab.model.checkpoint import save_model
from attnlab.model.transformer import Transformer

PROJECT = Path(__file__).resolve().parents[1]


def write_tokens(folder: Path, vocab_size: int = 512, n_train: int = 40_000, n_val: int = 6_000, seed: int = 0):
    """A token stream with structure (repeated phrases), so a tiny model's loss falls when it learns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrases = rng.integers(2, vocab_size, size=(64, 24))  # (n_phrases, phrase_len)

    def stream(n):
        picks = rng.integers(0, len(phrases), size=n // phrases.shape[1] + 1)
        return phrases[picks].reshape(-1)[:n].astype(np.uint16)

    train, val = stream(n_train), stream(n_val)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    meta = {
        "vocab_size": vocab_size, "eos_id": 1,
        "train": {"tokens": n_train, "bytes": 3 * n_train, "files": 10},
        "val": {"tokens": n_val, "bytes": 3 * n_val, "files": 2},
        "bytes_per_token": {"train": 3.0, "val": 3.0},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


TINY_TRAIN_PARAMS = {
    "tokenizer": {"vocab_size": 512},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32},
    "train": {"max_tokens": 8192, "batch_size": 8, "eval_tokens": 1024, "log_every": 4, "lr": 0.003},
    "attention": {"seq_len_filter": [8, 16]},
    "interventions": {"n_eval_tokens": 512, "mean_tokens": 512},
}


def write_params(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def stage_command(script: str, *args: str) -> list[str]:
    """The command line that runs stages/<script> with this interpreter."""
    return [sys.executable, str(PROJECT / "stages" / script), *args]


def stage_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT / "src"), **(env or {})}


def run_stage(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run stages/<script> as a real subprocess with this interpreter."""
    return subprocess.run(
        stage_command(script, *args), cwd=cwd, env=stage_env(env), capture_output=True, text=True, timeout=600,
        check=False,
    )


def kill_when_checkpoint_appears(cmd: list[str], checkpoint: Path, *, cwd: Path, env: dict | None = None,
                                 timeout: float = 600, poll_s: float = 0.01) -> subprocess.CompletedProcess:
    """Run cmd until the file `checkpoint` appears (or a new one replaces a finished run's, which is never
    resumed), then SIGKILL it and every process it started, as a dying machine would: no signal handler, no
    `finally`, no chance to write anything more.

    cmd runs in a session of its own, so killing its process group takes its children with it (dvc -> the
    stage's python). Descendants that started sessions of their own (torchrun's workers) are found first and
    killed by group too. Fails unless the run was still going when the checkpoint appeared, so a returned
    result is always a run killed mid-way (returncode -9 for cmd itself)."""
    checkpoint = Path(checkpoint)

    def written() -> tuple[int, int] | None:  # checkpoints are renamed into place: a new one has a new inode
        try:
            st = checkpoint.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    before = written()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: a full pipe would block cmd
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while written() in (None, before) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(poll_s)
            running = proc.poll() is None
            seen = written() not in (None, before)
        finally:
            _kill_process_tree(proc.pid)
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"),
                                             err.read().decode(errors="replace"))
    if not (seen and running):
        why = "was still running at the deadline" if running else f"ended (exit status {result.returncode})"
        raise AssertionError(
            f"{cmd} {why} before it could be killed at its first checkpoint {checkpoint}"
            f"{' (make its run longer)' if seen else ''}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def _kill_process_tree(pid: int) -> None:
    """SIGKILL the process group of pid (a session leader) and the groups of all its descendants, then wait
    until they are all gone, so that nothing still writes when the test goes on."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    groups = [pid]
    for child in descendants:
        try:
            groups.append(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    for group in dict.fromkeys(groups):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


# --------------------------------------------------------------------- tiny models and tokenizers

TOKENIZER_VOCAB = 384


def tiny_model(vocab_size: int = 61, seed: int = 0, **overrides) -> Transformer:
    """A tiny model in eval mode, its init seeded: d_model 32, 2 layers, 4 heads, seq 24 unless overridden."""
    fields = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=24)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    torch.manual_seed(seed)
    return Transformer(cfg, vocab_size).eval()


def training_text(max_chars: int = 24_000) -> str:
    """A few KB of real Python source from the standard library."""
    import argparse
    import json as json_module
    import textwrap

    parts = [Path(mod.__file__).read_text(encoding="utf-8") for mod in (textwrap, json_module.decoder, argparse)]
    return "".join(parts)[:max_chars]


def train_sentencepiece(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> spm.SentencePieceProcessor:
    """A lossless-on-code BPE model with byte fallback, written to `path` (a .model file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = training_text().splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_prefix=str(path.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        character_coverage=1.0,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(path))


def write_tokens_from_text(tokens_dir: Path, sp: spm.SentencePieceProcessor, text: str, val_fraction: float = 0.4) -> dict:
    """Encode text, split it into train/val by characters and write {train,val}.bin and meta.json."""
    tokens_dir.mkdir(parents=True, exist_ok=True)
    cut = int(len(text) * (1 - val_fraction))
    meta = {"vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id()}
    bpt = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.asarray(sp.encode(part) + [sp.eos_id()], dtype=np.uint16)
        ids.tofile(tokens_dir / f"{split}.bin")
        n_bytes = len(part.encode("utf-8"))
        meta[split] = {"tokens": int(len(ids)), "bytes": n_bytes, "files": 1}
        bpt[split] = n_bytes / len(ids)
    meta["bytes_per_token"] = bpt
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def write_model(path: Path, vocab_size: int, **overrides) -> Transformer:
    model = tiny_model(vocab_size=vocab_size, **overrides)
    save_model(path, model)
    return model
