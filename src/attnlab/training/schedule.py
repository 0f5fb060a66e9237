"""The optimisation recipe: token budget, warmup (with a floor in steps) and cosine schedule, AdamW with weight
decay chosen by parameter name, and the autocast precision."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from attnlab.core.device import native_bf16
from attnlab.core.params import ModelConfig, Params, TrainConfig
from attnlab.model.transformer import count_parameters


# bf16 autocast outruns fp32 on a CPU with native bf16 from this 6 * d_model + seq_len on (docs/performance.md,
# "The precision rule": a grid of shapes, fp32 and bf16 steps of the train stage side by side).
BF16_CPU_MIN_SIZE = 960


def bf16_outruns_fp32(model: ModelConfig) -> bool:
    """Whether this shape trains faster under bf16 autocast than in fp32 on a CPU with native bf16.

    Per number a layer writes, its matmuls do about 12 * d_model + 2 * seq_len multiply-adds (the projections
    and the MLP, then the attention scores and their weighted sum); bf16 makes those faster but adds a cast to
    every activation. Measured, bf16 wins where 6 * d_model + seq_len >= BF16_CPU_MIN_SIZE and loses below
    it, e.g. at the quick profile (d_model 128, seq_len 128: 896).
    """
    return 6 * model.d_model + model.seq_len >= BF16_CPU_MIN_SIZE


def precision_choice(train: TrainConfig, model: ModelConfig, device: torch.device,
                     native: bool | None = None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None = plain fp32) and why, as the train stage prints it.

    train.precision fp32 or bf16 is taken as it is. auto: bf16 on CUDA that supports it; on a CPU bf16 where it
    is native (avx512_bf16 or amx_bf16: `native`, by default attnlab.core.device.native_bf16; emulated it is far
    slower than fp32) and the shape gains from it (bf16_outruns_fp32); fp32 elsewhere, MPS included. The quality
    side: fp32 and bf16 over 3 seeds in docs/performance.md. Deterministic for given params and machine.
    """
    if train.precision != "auto":
        return (torch.bfloat16 if train.precision == "bf16" else None), f"train.precision={train.precision}"
    native = native_bf16(device) if native is None else native
    if device.type == "cuda":
        return (torch.bfloat16, "auto: CUDA with bf16") if native else (None, "auto: CUDA without bf16")
    if device.type != "cpu":
        return None, f"auto: fp32 on {device.type}"
    if not native:
        return None, "auto: this CPU emulates bf16 (no avx512_bf16/amx_bf16)"
    size = 6 * model.d_model + model.seq_len
    if bf16_outruns_fp32(model):
        return torch.bfloat16, f"auto: native bf16, 6 x d_model + seq_len = {size} >= {BF16_CPU_MIN_SIZE}"
    return None, f"auto: native bf16, but 6 x d_model + seq_len = {size} < {BF16_CPU_MIN_SIZE}: fp32 is faster"


def autocast_dtype(train: TrainConfig, model: ModelConfig, device: torch.device,
                   native: bool | None = None) -> torch.dtype | None:
    """bf16 autocast, or None for plain fp32: precision_choice's dtype."""
    return precision_choice(train, model, device, native)[0]


def precision_name(amp: torch.dtype | None) -> str:
    """What train.json and the checkpoint fingerprint call the resolved precision."""
    return "fp32" if amp is None else str(amp).removeprefix("torch.").replace("bfloat16", "bf16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 (or other) autocast on the device, or nothing for plain fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Budget:
    n_params: int
    total_tokens: int
    steps: int
    tokens_per_step: int
    warmup_steps: int


def make_budget(params: Params, vocab_size: int) -> Budget:
    cfg = params.train
    n_params = count_parameters(params.model, vocab_size)
    total = cfg.max_tokens or int(cfg.tokens_per_param * n_params)
    per_step = cfg.batch_size * params.model.seq_len
    steps = max(1, total // per_step)
    return Budget(n_params, steps * per_step, steps, per_step, warmup_steps(cfg, steps))


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """warmup_frac of the run, but at least train.warmup_steps, and never more than half the run.

    The floor matters for short runs: 2% of a 1,000-step run is 19 steps, too few for a post-norm model at
    lr 3e-3, which then sits at the unigram loss for hundreds of steps (docs/training.md).
    """
    return min(max(int(cfg.warmup_frac * steps), cfg.warmup_steps), steps // 2)


def lr_at(step: int, budget: Budget, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay that reaches cfg.lr * min_lr_ratio at the last step.

    Steps run from 0 to budget.steps - 1: the first step after warmup has the peak lr, the last one the floor.
    """
    if step < budget.warmup_steps:
        return cfg.lr * (step + 1) / budget.warmup_steps
    span = max(1, budget.steps - 1 - budget.warmup_steps)
    progress = min(1.0, (step - budget.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def decays(name: str, decay_embedding: bool) -> bool:
    """Whether AdamW decays the parameter of this name: weight matrices yes; biases (the non-linear heads'
    2-D `mlp_*_bias` too), LayerNorm weights and positional tables no; the token embedding if asked."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias") or ".ln" in f".{name}" or name.startswith("pos_emb"):
        return False
    if name.startswith("tok_emb"):
        return decay_embedding
    return leaf.endswith("weight")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay chosen by parameter name (see `decays`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(n, cfg.decay_embedding)]
    no_decay = [p for n, p in named if not decays(n, cfg.decay_embedding)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused_adamw(device) or None)


def fused_adamw(device: torch.device) -> bool:
    """Whether PyTorch has the fused AdamW kernel for this device (CPU, CUDA, MPS, ...). Without it the CPU falls
    back to a Python loop over the parameters (PyTorch picks foreach only on accelerators by default), ~6% of a
    quick-profile step (docs/performance.md)."""
    return device.type in _get_fused_kernels_supported_devices()
