"""The yardsticks attnlab is measured against, sharing none of attnlab.model or attnlab.training, so that a bug
in either shows up as a gap (`make bench`):

- ReferenceGPT and ReferenceTrainer: a plain pre-norm GPT and its textbook training loop (learned positions,
  no biases, a final LayerNorm, a tied head, GELU MLP of width d_ff, one fused QKV projection, PyTorch's fused
  causal attention; AdamW betas 0.9/0.95, weight decay 0.1 on every matrix, grad clip 1.0, lr 1e-3 with 5%
  linear warmup and a cosine to 0.1 x lr), on batches drawn exactly as attnlab's train stage draws them;
- TorchEncoderLM: torch.nn.TransformerEncoder as a causal LM, the speed reference at attnlab's shape.

Shapes: B batch, T sequence, D d_model, H heads, V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.core.params import ModelConfig
from attnlab.data.tokens import batch_starts, windows

LR, MIN_LR_RATIO, WARMUP_FRAC = 1e-3, 0.1, 0.05
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0


class ReferenceBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, self.n_heads = cfg.d_model, cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.fc, self.fc_out = nn.Linear(D, cfg.d_ff, bias=False), nn.Linear(cfg.d_ff, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)  # (B, T, D) each
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))  # (B, T, D)


class ReferenceGPT(nn.Module):
    """forward(idx: (B, T) int64) -> logits (B, T, V), at the shape of `cfg` (its d_model, n_layers, n_heads, d_ff,
    seq_len; nothing else of it)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # (B, T, V) tied head


def reference_lr(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return LR * MIN_LR_RATIO + 0.5 * LR * (1 - MIN_LR_RATIO) * (1 + math.cos(math.pi * progress))


class ReferenceTrainer:
    """The reference's training loop, one step at a time: step(i) trains on batch i of a `steps`-step run; in
    fp32, or with forward and loss under bf16 autocast (precision="bf16"), as nanoGPT's train.py does."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, train_tokens: np.ndarray, steps: int, batch_size: int,
                 seed: int, device: torch.device | str = "cpu", precision: str = "fp32"):
        torch.manual_seed(seed)
        self.seq_len, self.train_tokens, self.steps = cfg.seq_len, train_tokens, steps
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.bf16 = precision == "bf16"
        self.model = ReferenceGPT(cfg, vocab_size).to(device).train()
        groups = [{"params": [p for p in self.model.parameters() if p.dim() == dim], "weight_decay": decay}
                  for dim, decay in ((2, WEIGHT_DECAY), (1, 0.0))]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS)

    def step(self, i: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = reference_lr(i % self.steps, self.steps)
        T = self.seq_len
        x, y = windows(self.train_tokens, batch_starts(len(self.train_tokens), T, self.batch_size, self.seed, i), T)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x.to(self.device))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten())  # fp32 under autocast
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class TorchEncoderLM(nn.Module):
    """Embedding, torch.nn.TransformerEncoder with a causal mask, tied head: attnlab's shape and parameter
    count with pe=rope (no positional parameters); post-norm unless cfg.norm == "pre" (norm_first plus a final
    LayerNorm, as attnlab's ln_f); GELU MLP."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=cfg.norm == "pre")
        norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else None
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=norm, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.seq_len), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx) * math.sqrt(self.tok_emb.embedding_dim)  # (B, T, D)
        x = self.encoder(x, mask=self.mask[:T, :T], is_causal=True)  # (B, T, D)
        return x @ self.tok_emb.weight.t()  # (B, T, V)
