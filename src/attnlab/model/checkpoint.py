"""The trained model file: weights plus the model config and vocabulary size needed to rebuild it.

Analysis stages read the model's shape from this file, not from params.yaml, so that they rerun only when
the model itself changed. Loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from attnlab.core.errors import ConfigError
from attnlab.core.io import atomic_path
from attnlab.core.params import ModelConfig, _build
from attnlab.model.transformer import Transformer


def unwrap(model: torch.nn.Module) -> Transformer:
    """The plain Transformer inside a DDP and/or torch.compile wrapper."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def model_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """Config, vocabulary size and weights on the CPU; with `dtype` (e.g. torch.float16, for small snapshots)
    the floating tensors are cast to it. model_from_state loads either back into a float32 Transformer."""
    model = unwrap(model)

    def tensor(v: torch.Tensor) -> torch.Tensor:
        v = v.detach()
        return (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu()

    return {
        "model_config": dataclasses.asdict(model.cfg),
        "vocab_size": model.vocab_size,
        "state_dict": {k: tensor(v) for k, v in model.state_dict().items()},
    }


def save_model(path: str | Path, model: torch.nn.Module, meta: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    payload = model_state(model, dtype)
    payload["meta"] = meta or {}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def model_from_state(payload: dict) -> Transformer:
    cfg = _build(ModelConfig, payload["model_config"], "model.")
    model = Transformer(cfg, int(payload["vocab_size"]))
    model.load_state_dict(payload["state_dict"])
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Rebuild the trained model in eval mode on `device`; returns (model, meta)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), "model file not found: run the train stage first (dvc repro train)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_state(payload).to(device).eval()
    return model, payload.get("meta", {})
