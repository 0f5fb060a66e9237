"""A plain pre-norm GPT and its training loop: the yardstick attnlab's recipe is measured against.

Nothing here is shared with attnlab.model or attnlab.train on purpose, so that a bug in either shows up as a
gap between the two (`make bench`, section `quality`). The recipe is the textbook one:

- learned positions, no biases, pre-norm blocks, a final LayerNorm, a tied output head, GELU MLP of width d_ff,
  one fused QKV projection and PyTorch's fused causal attention;
- AdamW (betas 0.9/0.95), weight decay 0.1 on every matrix (the embedding included), grad clip 1.0;
- lr 1e-3, 5% linear warmup, cosine to 0.1 x lr; batches drawn exactly as attnlab's train stage draws them.

Shapes: B batch, T sequence, D d_model, H heads, V vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.data.tokens import batch_starts, windows

LR, MIN_LR_RATIO, WARMUP_FRAC = 1e-3, 0.1, 0.05
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0


@dataclass(frozen=True)
class ReferenceShape:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int


class ReferenceBlock(nn.Module):
    def __init__(self, shape: ReferenceShape):
        super().__init__()
        D = shape.d_model
        self.n_heads = shape.n_heads
        self.ln1 = nn.LayerNorm(D, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.ln2 = nn.LayerNorm(D, bias=False)
        self.fc = nn.Linear(D, shape.d_ff, bias=False)
        self.fc_out = nn.Linear(shape.d_ff, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))  # (B, T, D)


class ReferenceGPT(nn.Module):
    """forward(idx: (B, T) int64) -> logits (B, T, V)."""

    def __init__(self, shape: ReferenceShape):
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.seq_len, shape.d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(shape) for _ in range(shape.n_layers))
        self.ln_f = nn.LayerNorm(shape.d_model, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith("proj.weight") or name.endswith("fc_out.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.n_layers) if residual else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:T]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # (B, T, V) tied head


def reference_lr(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    floor = LR * MIN_LR_RATIO
    return floor + 0.5 * (LR - floor) * (1 + math.cos(math.pi * progress))


class ReferenceTrainer:
    """The reference's textbook training loop, one step at a time (`make bench` also interleaves these steps with
    windows of attnlab's train stage, so both speeds are measured at the same moments)."""

    def __init__(self, shape: ReferenceShape, train_tokens: np.ndarray, steps: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        torch.manual_seed(seed)
        self.shape, self.train_tokens, self.steps = shape, train_tokens, steps
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.model = ReferenceGPT(shape).to(device)
        matrices = [p for p in self.model.parameters() if p.dim() >= 2]
        others = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                            {"params": others, "weight_decay": 0.0}], lr=LR, betas=BETAS)
        self.model.train()

    def step(self, step: int) -> None:
        """One optimizer step on batch `step` (drawn as attnlab's train stage draws it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = reference_lr(step % self.steps, self.steps)
        seq_len = self.shape.seq_len
        x, y = windows(self.train_tokens, batch_starts(len(self.train_tokens), seq_len, self.batch_size, self.seed,
                                                       step), seq_len)
        logits = self.model(x.to(self.device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_reference(shape: ReferenceShape, train_tokens: np.ndarray, steps: int, batch_size: int, seed: int,
                    device: torch.device | str = "cpu") -> tuple[ReferenceGPT, float]:
    """Trains the reference for `steps` steps of `batch_size` windows; returns (model, training tokens/s)."""
    trainer = ReferenceTrainer(shape, train_tokens, steps, batch_size, seed, device)
    start = time.perf_counter()
    for step in range(steps):
        trainer.step(step)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return trainer.model, steps * batch_size * shape.seq_len / seconds
