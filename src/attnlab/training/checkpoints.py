"""Resumable checkpoints: model, optimizer, step and logs, written atomically, and the fingerprint a checkpoint
must match to be resumed (everything that changes the optimisation)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from attnlab.core.io import atomic_path
from attnlab.core.params import Params
from attnlab.model.checkpoint import unwrap


def fingerprint(params: Params, vocab_size: int, tokens_meta: dict) -> str:
    """What a checkpoint must match to be resumed: everything that changes the optimisation."""
    train = dataclasses.asdict(params.train)
    for key in ("device", "compile", "log_every", "checkpoint_every_frac", "checkpoint_every_min",
                "nproc_per_node", "backend", "micro_batch_size", "eval_every_frac", "eval_tokens"):
        train.pop(key)
    blob = {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "vocab_size": vocab_size,
        "tokens": {s: tokens_meta[s]["tokens"] for s in ("train", "val")},
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


def load_checkpoint(path: Path, fp: str, log) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is not a reason to lose the run: start fresh
        log(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); starting fresh")
        return None
    if state.get("fingerprint") != fp:
        log(f"checkpoint {path} is from other params or data; starting fresh")
        return None
    return state
