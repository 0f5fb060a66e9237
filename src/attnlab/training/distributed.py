"""Data parallelism under torchrun: which process this is, and the process/device/backend combinations
refused before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attnlab.core.errors import ConfigError
from attnlab.core.params import TrainConfig


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain process is rank 0 of 1."""
    return Dist(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def check_world(cfg: TrainConfig, device: torch.device, nproc_per_node: int, world_size: int) -> str:
    """Refuse bad process/device/backend combinations before any work starts; returns the backend."""
    if nproc_per_node > 1 and device.type == "cuda" and nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            "train.nproc_per_node",
            f"{nproc_per_node} processes per node but only {torch.cuda.device_count()} GPU(s) on this machine",
        )
    if world_size > 1 and device.type == "mps":
        raise ConfigError("train.nproc_per_node", "data-parallel training is not supported on MPS; use 1")
    if cfg.batch_size % world_size:
        raise ConfigError("train.batch_size", f"{cfg.batch_size} is not divisible by the {world_size} processes")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("train.backend", f"nccl needs CUDA devices, but training runs on {device.type}; use gloo")
    return backend
