"""Weight snapshots taken during training, one at initialization (step 0) and one at every validation point, so
attention can be followed across training from its start (the attention_dynamics stage).

A snapshot is a model file (attnlab.model.checkpoint format: config, vocabulary size, weights) with its floating
tensors in float16, named step_000123.pt in its folder (models/snapshots), its meta {"step", "train_tokens",
"fingerprint"}; attnlab.model.checkpoint.load_model loads it back into a float32 Transformer. Written atomically.

A run resuming from its checkpoint at step s keeps the snapshots up to s and removes the later ones (the run
recomputes them) and any of other params; a fresh run (s = 0) removes them all.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from attnlab.model.checkpoint import save_model

SNAPSHOT_DTYPE = torch.float16
NAME = re.compile(r"^step_(\d+)\.pt$")
LEFTOVER = re.compile(r"^\.step_\d+\.pt\..*\.tmp$")  # a write killed midway (core.io.atomic_path's temp file)


def snapshot_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def save_snapshot(folder: str | Path, model: torch.nn.Module, step: int, train_tokens: int,
                  fingerprint: str = "") -> Path:
    """Write the weights of `model` after `step` steps (train_tokens tokens) as float16; returns the file."""
    path = snapshot_path(folder, step)
    meta = {"step": int(step), "train_tokens": int(train_tokens), "fingerprint": fingerprint}
    save_model(path, model, meta=meta, dtype=SNAPSHOT_DTYPE)
    return path


def list_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of every snapshot in `folder`, by step; [] when the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def snapshot_meta(path: str | Path) -> dict:
    """The meta of a snapshot file ({} when it has none), without reading its weights into memory."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta", {})


def _belongs(path: Path, fingerprint: str | None) -> bool:
    if fingerprint is None:
        return True
    try:
        return snapshot_meta(path).get("fingerprint") == fingerprint
    except Exception:  # unreadable (e.g. truncated by hand): not a snapshot of this run
        return False


def prune_snapshots(folder: str | Path, after_step: int, fingerprint: str | None = None) -> list[Path]:
    """Remove the snapshots of steps after `after_step`, those of another fingerprint (when one is given) and
    the temp files of writes killed midway; returns the removed snapshot files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for step, path in list_snapshots(folder):
        if step > after_step or not _belongs(path, fingerprint):
            path.unlink()
            removed.append(path)
    for path in folder.iterdir():
        if LEFTOVER.match(path.name):
            path.unlink(missing_ok=True)
    return removed
