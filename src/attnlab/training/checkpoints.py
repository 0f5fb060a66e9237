"""Resumable checkpoints: model, optimizer, step and logs, written atomically, and the fingerprint a checkpoint
must match to be resumed (everything that changes the optimisation).

The fingerprint covers the params that shape the optimisation, the resolved precision (``auto`` resolves per
host), the content of the token files and the source of every module the train stage runs. A checkpoint of
another fingerprint is never resumed, and neither is one of a finished run (see ``resumable``): the train stage
only reruns because something it depends on changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

import attnlab
from attnlab.core.io import atomic_path
from attnlab.core.params import Params
from attnlab.model.checkpoint import unwrap


# The sub-packages the train stage runs code from: the train stage's src deps in dvc.yaml (a test checks that
# the two agree), so an edit that reruns the stage also changes the fingerprint.
TRAINING_PACKAGES = ("core", "data", "model", "training")
# Train params that change how a run is executed or logged, not the optimisation it performs.
NOT_FINGERPRINTED = ("device", "precision", "compile", "log_every", "checkpoint_every_frac", "checkpoint_every_min",
                     "nproc_per_node", "backend", "micro_batch_size", "eval_every_frac", "eval_tokens")


def source_files(package_root: Path | None = None) -> list[Path]:
    """The source files whose code the train stage runs: attnlab/__init__.py and TRAINING_PACKAGES."""
    root = Path(attnlab.__file__).parent if package_root is None else package_root
    files = [root / "__init__.py"]
    for package in TRAINING_PACKAGES:
        files += sorted((root / package).rglob("*.py"))
    return files


def file_digest(paths: list[Path], root: Path | None = None) -> str:
    """A hash over the names (relative to root, when given) and contents of the files, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        name = path.relative_to(root).as_posix() if root is not None else path.name
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def fingerprint(params: Params, vocab_size: int, tokens_dir: Path, precision: str) -> str:
    """What a checkpoint must match to be resumed: everything that changes the optimisation. `precision` is the
    resolved one ("fp32" or "bf16"), not train.precision."""
    train = dataclasses.asdict(params.train)
    for key in NOT_FINGERPRINTED:
        train.pop(key)
    package_root = Path(attnlab.__file__).parent
    blob = {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "precision": precision,
        "vocab_size": vocab_size,
        "tokens": file_digest([Path(tokens_dir) / f"{split}.bin" for split in ("train", "val")]),
        "source": file_digest(source_files(package_root), package_root),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, model, optimizer, step: int, fp: str, rows: list, val_rows: list) -> None:
    state = {
        "fingerprint": fp,
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rows": rows,
        "val_rows": val_rows,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fp: str, total_steps: int, log) -> dict | None:
    """The state to resume from: a readable checkpoint of this fingerprint from an unfinished run; else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is not a reason to lose the run: start fresh
        log(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); starting fresh")
        return None
    if state.get("fingerprint") != fp:
        log(f"checkpoint {path} is from other params, data, precision or code; starting fresh")
        return None
    if int(state["step"]) >= total_steps:
        log(f"checkpoint {path} is of a finished run; training again from step 0")
        return None
    return state
