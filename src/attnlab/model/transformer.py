"""The transformer, written from scratch: the whole forward pass lives in this file.

Reads top to bottom: positional encodings, HookPoint, CausalSelfAttention, MLP, Block, Transformer.
No nn.MultiheadAttention or nn.Transformer*: each attention layer has its own Q/K/V/output projections —
one fused (D, 3D) linear map where all three are linear (the common case), separate modules where a variant
needs its own (model.pe=complex, non-linear Q/K/V heads).

Attention has two paths with the same result:
- fused: torch.nn.functional.scaled_dot_product_attention (used for training and plain inference); with
  model.pe=alibi its linear biases go in as a float mask, -inf after the query;
- explicit: scores (+ ALiBi's bias) -> causal mask -> softmax -> weights @ V, with the scores and weights passed through
  named identity modules (``hook_scores``, ``hook_pattern``) so that attnlab.analysis.capture can read or edit them.
The explicit path runs whenever a hook is registered on those points, or ``force_explicit`` is set; the
model's forward signature and return type never change.

Shapes: B batch, T sequence, D d_model, H heads, Dh head dimension, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.core.params import ModelConfig, parse_head_selector
from attnlab.model.positional import (ComplexLinear, alibi_bias, alibi_slopes, rope_rotation, rotate_heads,
                                      rotate_pairs, sinusoidal_table)

# ------------------------------------------------------------------------------------------------- hooks


class HookPoint(nn.Identity):
    """A named identity on an activation: forward hooks registered here read or replace the activation."""

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)


# --------------------------------------------------------------------------------------------- attention


class Projection(nn.Module):
    """Q, K or V for all heads: a linear map, or for chosen heads a small GELU MLP (model.qkv_nonlinear_*).

    The linear map produces only the other heads' slices, so every parameter is used. The chosen heads' MLPs
    run batched: chosen head n gives gelu(x @ mlp_in_weight[n] + mlp_in_bias[n]) @ mlp_out_weight[n]
    + mlp_out_bias[n]. Output (B, T, D), heads laid out as H consecutive slices of Dh.
    """

    def __init__(self, cfg: ModelConfig, nonlinear_heads: list[int]):
        super().__init__()
        D, Dh, H, hidden = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.qkv_nonlinear_hidden
        self.d_head = Dh
        self.nonlinear_heads = sorted(set(nonlinear_heads))
        self.linear_heads = [head for head in range(H) if head not in self.nonlinear_heads]
        self.linear = nn.Linear(D, len(self.linear_heads) * Dh) if self.linear_heads else None
        n = len(self.nonlinear_heads)
        if n:
            self.mlp_in_weight = nn.Parameter(torch.randn(n, D, hidden) * 0.02)
            self.mlp_in_bias = nn.Parameter(torch.zeros(n, hidden))
            self.mlp_out_weight = nn.Parameter(torch.randn(n, hidden, Dh) * 0.02)
            self.mlp_out_bias = nn.Parameter(torch.zeros(n, Dh))
            # the linear heads come first, then the MLP heads; head_order puts them back in head order
            order = torch.argsort(torch.tensor(self.linear_heads + self.nonlinear_heads))
            self.register_buffer("head_order", order, persistent=False)  # (H,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nonlinear_heads:
            return self.linear(x)  # (B, T, D)
        B, T, _ = x.shape
        hidden = F.gelu(torch.einsum("btd,ndf->btnf", x, self.mlp_in_weight) + self.mlp_in_bias)  # (B, T, n, F)
        heads = torch.einsum("btnf,nfe->btne", hidden, self.mlp_out_weight) + self.mlp_out_bias  # (B, T, n, Dh)
        if self.linear is not None:
            linear = self.linear(x).view(B, T, len(self.linear_heads), self.d_head)  # (B, T, H - n, Dh)
            heads = torch.cat((linear, heads), dim=2)  # (B, T, H, Dh), linear heads first
        return heads[:, :, self.head_order].flatten(2)  # (B, T, D) in head order


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.d_head, self.d_model = cfg.n_heads, cfg.d_head, cfg.d_model
        self.pe = cfg.pe
        nonlinear = _nonlinear_heads(cfg, layer)
        self.fused = cfg.pe != "complex" and not (nonlinear and cfg.qkv_nonlinear_parts)
        if self.fused:  # q, k, v in one matmul: rows [0, D) are W_q, [D, 2D) W_k, [2D, 3D) W_v
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        else:
            if cfg.pe == "complex":  # config.py rejects a non-linear Q/K here
                self.q_proj, self.k_proj = ComplexLinear(cfg.d_model), ComplexLinear(cfg.d_model)
            else:
                self.q_proj = Projection(cfg, nonlinear if "q" in cfg.qkv_nonlinear_parts else [])
                self.k_proj = Projection(cfg, nonlinear if "k" in cfg.qkv_nonlinear_parts else [])
            self.v_proj = Projection(cfg, nonlinear if "v" in cfg.qkv_nonlinear_parts else [])
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.force_explicit = False  # set by capture/edit helpers that need the explicit path without hooks

        self.hook_scores = HookPoint()  # (B, H, T, T) scaled scores (+ ALiBi's bias), -inf above the diagonal
        self.hook_pattern = HookPoint()  # (B, H, T, T) attention weights, rows sum to 1
        self.hook_head_out = HookPoint()  # (B, H, T, Dh) each head's output before the output projection

        if cfg.pe in ("rope", "rope_model_dim", "complex"):  # e^{j t theta_i}, computed once
            rope_dim = cfg.d_head if cfg.pe == "rope" else cfg.d_model  # complex: see complex_pe_angles
            turn = rope_rotation(cfg.seq_len, rope_dim, cfg.rope_base)
            self.register_buffer("rope_turn", turn, persistent=False)  # (T, rope_dim/2) complex64
        if cfg.pe == "alibi":  # no position in the stream: a per-head linear bias on the scores, any length
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)  # (H,)

    @property
    def rope_cos(self) -> torch.Tensor:
        return self.rope_turn.real  # (T, rope_dim/2)

    @property
    def rope_sin(self) -> torch.Tensor:
        return self.rope_turn.imag  # (T, rope_dim/2)

    @property
    def explicit(self) -> bool:
        return self.force_explicit or self.hook_scores.active or self.hook_pattern.active

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of input x (B, T, D), each (B, T, D), heads as H consecutive slices of Dh; q and k without
        RoPE (model.pe=complex: with its position phases, which come before its projections)."""
        if self.fused:
            return self.qkv(x).split(self.d_model, dim=-1)  # (B, T, D) each
        if self.pe == "complex":  # position t turns pair i of the token vector by t * theta_i, then W q/k
            x_pos = rotate_pairs(x, self.rope_turn[: x.shape[1]])  # (B, T, D) D/2 complex numbers
            return self.q_proj(x_pos), self.k_proj(x_pos), self.v_proj(x)  # v real, without position
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotated_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of x (B, T, D) as the scores use them: q and k with RoPE where model.pe is rope or
        rope_model_dim. Each (B, T, D)."""
        T, D = x.shape[1], self.d_model
        if self.pe == "rope" and self.fused:  # per head, q and k in one product: [q | k] is 2H heads side by side
            qk, v = self.qkv(x).split((2 * D, D), dim=-1)  # (B, T, 2D), (B, T, D); split: one cat backward
            q, k = rotate_heads(qk, self.rope_turn).split(D, dim=-1)  # (B, T, D) each
            return q, k, v
        q, k, v = self.projections(x)  # (B, T, D) each
        if self.pe == "rope":  # per head: scores depend on relative position only
            q, k = rotate_heads(q, self.rope_turn), rotate_heads(k, self.rope_turn)
        if self.pe == "rope_model_dim":  # the original study's first version: rotate all D dims, then split
            q, k = rotate_pairs(q, self.rope_turn[:T]), rotate_pairs(k, self.rope_turn[:T])
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, Dh = self.n_heads, self.d_head
        q, k, v = self.rotated_projections(x)  # (B, T, D) each
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)

        dropout_p = self.dropout if self.training else 0.0
        if self.explicit:
            out = self._explicit_attention(q, k, v, dropout_p)
        elif self.pe == "alibi":  # SDPA takes the bias as a float mask; is_causal cannot be combined with one
            mask = self._alibi_mask(T, q.dtype)  # (H, T, T), broadcast over B
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, T, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, H, T, Dh)
        out = self.hook_head_out(out)  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(out)

    def _explicit_attention(self, q, k, v, dropout_p: float) -> torch.Tensor:
        B, H, T, Dh = q.shape
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        if self.pe == "alibi":
            mask = self._alibi_mask(T, dtype)  # (H, T, T): the bias, -inf where key > query
        else:
            mask = causal_mask(T, dtype, q.device)  # (1, T, T)
        # mask + (q @ k^T) / sqrt(Dh) in one batched GEMM: its output starts as the mask, and the scaled product
        # is added onto it, so the scores are written once; the causal mask broadcasts over the B H matrices as
        # it is written, ALiBi's (one per head) is laid out for them first
        keys = k.reshape(B * H, T, Dh).transpose(1, 2)  # (B H, Dh, T)
        start = mask.expand(B, H, T, T).reshape(B * H, T, T) if self.pe == "alibi" else mask  # (B H | 1, T, T)
        scores = torch.baddbmm(start, q.reshape(B * H, T, Dh), keys, alpha=1.0 / math.sqrt(Dh))
        scores = scores.view(B, H, T, T)  # (B, H, T, T)
        scores = self.hook_scores(scores)  # (B, H, T, T)
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16 up to fp32; fp64 stays fp64
        pattern = torch.softmax(scores.to(softmax_dtype), dim=-1).to(q.dtype)  # (B, H, T, T)
        pattern = self.hook_pattern(pattern)
        if dropout_p:
            pattern = F.dropout(pattern, p=dropout_p)
        return pattern @ v  # (B, H, T, Dh)


    def _alibi_mask(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        """The fused path's float mask: ALiBi's bias where key <= query, -inf after it. (H, T, T) in `dtype`."""
        causal = torch.ones(T, T, dtype=torch.bool, device=self.alibi_slopes.device).tril()  # (T, T)
        return alibi_bias(self.alibi_slopes, T).masked_fill(~causal, float("-inf")).to(dtype)  # (H, T, T)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # a plain tensor, usable under inference mode and under autograd alike
def causal_mask(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, T, T): 0 where key <= query, -inf after it; one per (T, dtype, device), shared and never written."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)[None]


def _nonlinear_heads(cfg: ModelConfig, layer: int) -> list[int]:
    chosen = set()
    for spec in cfg.qkv_nonlinear_heads:
        chosen.update(parse_head_selector(spec, cfg.n_layers, cfg.n_heads, "model.qkv_nonlinear_heads"))
    return sorted(head for (lay, head) in chosen if lay == layer)


# ------------------------------------------------------------------------------------------ MLP and block


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, D)


class Block(nn.Module):
    """post-norm (the original study): x = ln(x + f(x)); pre-norm: x = x + f(ln(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_post = HookPoint()  # (B, T, D) the residual stream after this block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attention(x))
            x = x + self.drop(self.mlp(self.ln2(x)))
        else:
            x = self.ln1(x + self.drop(self.attention(x)))
            x = self.ln2(x + self.drop(self.mlp(x)))
        return self.hook_resid_post(x)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention sublayer's output for the block's input x (B, T, D), before the residual add."""
        return self.attn(self.ln1(x) if self.pre_norm else x)


# ------------------------------------------------------------------------------------------- transformer


class Transformer(nn.Module):
    """Decoder-only language model. forward(idx: (B, T) int64) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        D = cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, D)  # tied with the output head
        if cfg.pe == "learned":
            self.pos_emb = nn.Embedding(cfg.seq_len, D)
        if cfg.pe == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.seq_len, D), persistent=False)  # (T, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D) if cfg.norm == "pre" else nn.Identity()
        self.hook_embed = HookPoint()  # (B, T, D) token (+ absolute position) embedding
        self.max_len = cfg.seq_len  # the length guard; longer_context() opens it for one evaluation
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # LayerNorm weight
                nn.init.ones_(p)
            elif name.endswith("out_proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))  # GPT-2 residual scaling
            else:
                nn.init.normal_(p, std=0.02)
        # std 0.02 as GPT-2: through the tied head a unit-norm residual still holding its own token's embedding
        # predicts that token with logit |e| * sqrt(D); at std D^-0.5 that is sqrt(D) and post-norm models stall
        # at the unigram loss, at 0.02 it is ~0.02 * D.
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    @property
    def attention_layers(self) -> list[CausalSelfAttention]:
        return [block.attn for block in self.blocks]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.residual(idx) @ self.tok_emb.weight.t()  # (B, T, V) tied head

    def residual(self, idx: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block and ln_f, what the tied head reads: (B, T, D). The train
        stage's loss takes it from here (attnlab.model.loss), so that the logits are never materialised."""
        x = self.embed(idx)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.ln_f(x)  # (B, T, D)

    def attend(self, idx: torch.Tensor) -> None:
        """Every layer's attention over idx and nothing after the last one (its block's MLP, ln_f, the head):
        for hooks on the attention layers' points, which is all that the attention statistics read."""
        x = self.embed(idx)  # (B, T, D)
        for block in self.blocks[:-1]:
            x = block(x)  # (B, T, D)
        self.blocks[-1].attention(x)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token (+ absolute position) embeddings of idx (B, T): (B, T, D), through hook_embed."""
        B, T = idx.shape
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len} "
                             "(attnlab.model.transformer.longer_context evaluates past it)")
        x = self.tok_emb(idx) * math.sqrt(self.cfg.d_model)  # (B, T, D)
        if self.cfg.pe == "learned":
            x = x + self.pos_emb.weight[:T]
        elif self.cfg.pe == "sinusoidal":
            x = x + self.pos_table[:T]
        return self.hook_embed(self.drop(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Closed-form parameter count (tied embedding counted once); tests check it against the module."""
    D, F_, L, Hn, Dh = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.qkv_nonlinear_hidden, cfg.d_head
    per_layer = 4 * (D * D + D)  # q, k, v, out projections with biases
    if cfg.pe == "complex":  # q and k: one real (D/2, D/2) weight each, no bias
        per_layer += 2 * ((D // 2) ** 2 - (D * D + D))
    per_layer += D * F_ + F_ + F_ * D + D  # MLP
    per_layer += 2 * 2 * D  # two LayerNorms
    total = vocab_size * D + L * per_layer
    if cfg.pe == "learned":
        total += cfg.seq_len * D
    if cfg.norm == "pre":
        total += 2 * D
    # each non-linear head swaps its Dh rows of the linear map (weights and biases) for a GELU MLP
    head_mlp = D * Hn + Hn + Hn * Dh + Dh
    head_linear = Dh * D + Dh
    n_nonlinear = sum(len(_nonlinear_heads(cfg, layer)) for layer in range(L))
    total += n_nonlinear * len(cfg.qkv_nonlinear_parts) * (head_mlp - head_linear)
    return total


def flops_per_token(cfg: ModelConfig, n_params: int) -> int:
    """Training FLOPs per token: 6 * params + 12 * layers * seq_len * d_model (attention scores)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model


@contextlib.contextmanager
def longer_context(model: Transformer, length: int) -> Iterator[Transformer]:
    """Lets the model run on sequences of up to `length` tokens inside the block, for length generalization.

    RoPE angles (rope, rope_model_dim, complex) and the sinusoidal table are extended by their closed forms (the
    first seq_len rows are unchanged); ALiBi's bias is computed for any length and needs nothing; the length
    guard is opened. Learned positions have no values past the
    trained length: ValueError. Everything is restored on exit, also on error.
    """
    cfg = model.cfg
    if cfg.pe == "learned" and length > cfg.seq_len:
        raise ValueError(f"model.pe=learned has no positions past model.seq_len={cfg.seq_len}")
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    for attn in model.attention_layers:
        if hasattr(attn, "rope_turn"):
            dim = 2 * attn.rope_turn.shape[-1]
            saved.append((attn, "rope_turn", attn.rope_turn))
            attn.rope_turn = rope_rotation(length, dim, cfg.rope_base).to(attn.rope_turn.device)  # (length, dim/2)
    if cfg.pe == "sinusoidal":
        saved.append((model, "pos_table", model.pos_table))
        model.pos_table = sinusoidal_table(length, cfg.d_model).to(model.pos_table.device)  # (length, D)
    old_max = model.max_len
    model.max_len = max(length, old_max)
    try:
        yield model
    finally:
        model.max_len = old_max
        for module, name, tensor in saved:
            setattr(module, name, tensor)
