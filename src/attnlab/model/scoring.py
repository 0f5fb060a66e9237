"""The one way a model is scored on tokens: mean next-token cross-entropy over windows, and its baseline.

Every reported loss goes through :func:`score_batches`: the train stage's periodic validation, `evaluate`,
the interventions (baseline and every sweep point), ``Lab.loss`` and the bench's quality reference. It always
scores in fp32, whatever precision the model was trained in, so every loss the lab reports is comparable. Which
windows are scored is chosen by the caller with :mod:`attnlab.data` (``eval_starts`` for evaluate and the
train stage, ``example_starts`` for the analyses), so two numbers that score different tokens can say so
(``Score.n_tokens``).

:func:`unigram_loss` is the yardstick for "did it learn": the cross-entropy of the train split's token
frequencies (add-one smoothing over the whole vocabulary) on the same targets a model is scored on.

Shapes: B batch, T sequence, V vocabulary, N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from attnlab.core.progress import progress_bar
from attnlab.data.tokens import windows
from attnlab.model.loss import head_token_losses
from attnlab.model.transformer import Transformer

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T), next-token targets (B, T), int64


@dataclass(frozen=True)
class Score:
    loss: float  # mean next-token cross-entropy, nats/token
    n_tokens: int  # target tokens scored
    position_loss: tuple[float, ...] = ()  # mean loss at each position of the window (0 = first target)
    position_tokens: tuple[int, ...] = ()  # targets scored at each position
    window_loss: tuple[float, ...] = ()  # mean loss of each window, in the order the batches gave them


def iter_batches(tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int,
                 device: torch.device | str) -> Iterator[Batch]:
    """Batches of windows starting at `starts`, in order, moved to the device."""
    for i in range(0, len(starts), batch_size):
        inputs, targets = windows(tokens, starts[i : i + batch_size], seq_len)  # (B, T) each
        yield inputs.to(device), targets.to(device)


@torch.no_grad()
def score_batches(
    model: torch.nn.Module, batches: Iterable[Batch],
    after_forward: Callable[[], None] | None = None, progress: bool = False, total: int | None = None,
) -> Score:
    """Mean next-token loss of the model over the batches (model in eval mode). `after_forward` runs after each
    forward pass, e.g. to read attention captured in that same pass."""
    return score_parts(model, batches, 1, after_forward, progress, total)[0]


@torch.no_grad()
def score_parts(
    model: torch.nn.Module, batches: Iterable[Batch], parts: int,
    after_forward: Callable[[], None] | None = None, progress: bool = False, total: int | None = None,
) -> list[Score]:
    """score_batches of batches that stack `parts` equal parts (rows [r b, (r+1) b) of a batch of parts * b
    windows are part r, e.g. the same windows under different interventions): one Score per part, each summed
    from its own rows only, in the order score_batches sums them."""
    model.eval()
    device = next(model.parameters()).device
    position_sum: torch.Tensor | None = None  # (parts, T) float64 loss summed over windows
    position_count: torch.Tensor | None = None  # (parts, T) windows that reach each position
    window_means: list[torch.Tensor] = []  # (parts, b) float64 each: every window's mean loss
    bar = progress_bar(batches, desc="score", unit="batch", total=total, disable=not progress, leave=False)
    for inputs, targets in bar:
        losses = token_losses(model, inputs, targets).unflatten(0, (parts, -1))  # (parts, b, T)
        T = targets.shape[1]
        if position_sum is None:
            position_sum = torch.zeros(parts, T, dtype=torch.float64, device=device)
            position_count = torch.zeros(parts, T, dtype=torch.int64, device=device)
        position_sum += losses.double().sum(1)
        position_count += losses.shape[1]
        window_means.append(losses.double().mean(-1))  # (parts, b)
        if after_forward is not None:
            after_forward()
    if position_sum is None:
        raise ValueError("score_batches: no tokens to score")
    windows_loss = torch.cat(window_means, dim=1)  # (parts, n windows)
    return [_score(position_sum[part], position_count[part], windows_loss[part]) for part in range(parts)]


def _score(position_sum: torch.Tensor, position_count: torch.Tensor, window_loss: torch.Tensor) -> Score:
    """A Score from the (T,) loss sums and window counts of each position and the (n,) windows' mean losses."""
    n_tokens = int(position_count.sum().item())
    per_position = (position_sum / position_count.clamp(min=1)).tolist()
    return Score(loss=float(position_sum.sum().item() / n_tokens), n_tokens=n_tokens,
                 position_loss=tuple(per_position), position_tokens=tuple(position_count.tolist()),
                 window_loss=tuple(window_loss.tolist()))


def token_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The next-token loss at every position, (B, T) float32. attnlab's Transformer goes through its residual
    stream and the head a block of rows at a time (head_token_losses: no (B, T, V) logits); any other model
    through its logits."""
    if isinstance(model, Transformer):
        return head_token_losses(model.residual(inputs), model.tok_emb.weight, targets)
    B, T = targets.shape
    logits = model(inputs)  # (B, T, V)
    # over rows of V contiguous logits: (B, V, T) through transpose(1, 2) takes a strided path ~7x slower
    return F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), reduction="none").view(B, T)


def score_windows(
    model: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int,
    progress: bool = False,
) -> Score:
    """score_batches over the windows of `tokens` that start at `starts` (each seq_len + 1 tokens long)."""
    device = next(model.parameters()).device
    batches = iter_batches(tokens, starts, seq_len, batch_size, device)
    return score_batches(model, batches, progress=progress, total=-(-len(starts) // batch_size))


def window_targets(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """The target ids those windows score: (len(starts) * seq_len,) in window order."""
    idx = starts[:, None] + 1 + np.arange(seq_len)[None, :]  # (n, T)
    return np.asarray(tokens[idx.ravel()], dtype=np.int64)


def unigram_loss(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of the targets under the train split's token frequencies, add-one smoothed over
    all vocab_size ids: p(v) = (count(v) + 1) / (N + V)."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64)  # (V,)
    if len(counts) > vocab_size:
        raise ValueError(f"train tokens hold id {len(counts) - 1}, outside the vocabulary of {vocab_size}")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)  # (V,)
    return float(-log_p[np.asarray(targets, dtype=np.int64)].mean())
