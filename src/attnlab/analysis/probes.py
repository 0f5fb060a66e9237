"""Where position lives in the residual stream: a linear position probe and a position/token variance split.

Both read the residual stream at each point of the trained model: the embedding output (``hook_embed``) and
each layer's output (``blocks.<layer>.hook_resid_post``), over a fixed, seeded set of validation windows.

- Position probe: closed-form ridge regression from the D residual dimensions to the absolute position
  (0 .. T-1), fitted on the first half of the windows and scored (R^2) on the other half.
- Variance split: for each dimension, the share of its variance explained by the position (variance of the
  per-position means over the total variance) and by the token id (variance of the per-token means, each
  token weighted by its count). These are eta^2; with few samples per group they are biased up even on noise,
  so ``*_share_adjusted`` also gives epsilon^2 = (SS_between - (k - 1) MS_within) / SS_total, zero on noise
  in expectation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnlab.core.progress import progress_bar
from attnlab.analysis.capture import capture_points
from attnlab.core.errors import ConfigError
from attnlab.data.tokens import check_length, example_starts, load_tokens, windows
from attnlab.core.device import pick_device
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer

# ------------------------------------------------------------------------------------------- ridge probe


def ridge_fit(features: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge with an unpenalised intercept: w = (Xc^T Xc + ridge I)^-1 Xc^T yc on centred data.

    features (N, D), target (N,). Returns (weight (D,), bias ()) in float64.
    """
    x, y = features.double(), target.double()
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc, yc = x - x_mean, y - y_mean  # (N, D), (N,)
    gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=torch.float64)  # (D, D)
    weight = torch.linalg.solve(gram, xc.T @ yc)  # (D,)
    return weight, y_mean - x_mean @ weight


def r2_score(target: torch.Tensor, prediction: torch.Tensor) -> float:
    """1 - SS_res / SS_tot: 1 for a perfect fit, 0 for predicting the mean, negative when worse."""
    target, prediction = target.double(), prediction.double()
    ss_res = ((target - prediction) ** 2).sum()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1.0 - ss_res / ss_tot)


def probe_r2(acts: torch.Tensor, target: torch.Tensor, ridge: float) -> float:
    """Fit a ridge probe on the first half of the examples, return R^2 on the second half.

    acts (E, T, D) activations, target (E, T) what to predict. Needs E >= 2.
    """
    E, T, D = acts.shape
    if E < 2:
        raise ValueError(f"a held-out probe needs at least 2 examples, got {E}")
    n_fit = E // 2
    weight, bias = ridge_fit(acts[:n_fit].reshape(-1, D), target[:n_fit].reshape(-1), ridge)
    held_out = acts[n_fit:].reshape(-1, D).double()  # (E_held * T, D)
    return r2_score(target[n_fit:].reshape(-1), held_out @ weight + bias)


def position_probe_r2(acts: torch.Tensor, ridge: float) -> float:
    """Held-out R^2 of a linear probe predicting the absolute position from acts (E, T, D)."""
    E, T, _ = acts.shape
    positions = torch.arange(T, dtype=torch.float64).expand(E, T)  # (E, T)
    return probe_r2(acts, positions, ridge)


# ------------------------------------------------------------------------------------------ variance split


def between_group_shares(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the share of variance between groups: eta^2 and epsilon^2 (chance-corrected).

    values (N, D), groups (N,) int64 labels. Returns two (D,) float64 tensors. A column with no variance
    gets 0 for both.
    """
    values = values.double()
    N, D = values.shape
    labels, group = torch.unique(groups, return_inverse=True)  # group (N,) in [0, k)
    k = len(labels)
    counts = torch.bincount(group, minlength=k).double()  # (k,)
    sums = torch.zeros(k, D, dtype=torch.float64).index_add_(0, group, values)  # (k, D)
    means = sums / counts[:, None]  # (k, D) per-group means
    grand = values.mean(dim=0)  # (D,)
    ss_total = ((values - grand) ** 2).sum(dim=0)  # (D,)
    ss_between = (counts[:, None] * (means - grand) ** 2).sum(dim=0)  # (D,)
    ms_within = (ss_total - ss_between) / max(N - k, 1)  # (D,)
    safe = torch.where(ss_total > 0, ss_total, torch.ones_like(ss_total))
    eta_sq = torch.where(ss_total > 0, ss_between / safe, torch.zeros_like(ss_total))
    eps_sq = torch.where(ss_total > 0, (ss_between - (k - 1) * ms_within) / safe, torch.zeros_like(ss_total))
    return eta_sq, eps_sq


def variance_split(acts: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each dimension of acts (E, T, D): variance shares explained by position and by token id (E, T).

    Returns (D,) tensors: position_share, token_share (eta^2) and their *_adjusted (epsilon^2) versions.
    """
    E, T, D = acts.shape
    flat = acts.reshape(E * T, D)  # (E*T, D)
    positions = torch.arange(T).repeat(E)  # (E*T,) position of each row
    pos_eta, pos_eps = between_group_shares(flat, positions)
    tok_eta, tok_eps = between_group_shares(flat, tokens.reshape(-1).long())
    return {
        "position_share": pos_eta,
        "token_share": tok_eta,
        "position_share_adjusted": pos_eps,
        "token_share_adjusted": tok_eps,
    }


# ------------------------------------------------------------------------------------- model activations


def residual_points(model: Transformer) -> dict[str, str]:
    """Display name -> HookPoint module name: the embedding output, then each layer's residual stream."""
    points = {"embed": "hook_embed"}
    points.update({f"layer {layer}": f"blocks.{layer}.hook_resid_post" for layer in range(len(model.blocks))})
    return points


@torch.no_grad()
def residual_activations(model: Transformer, idx: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Run idx (E, T) through the model in batches; the residual stream at each point, (E, T, D) float32 CPU."""
    points = residual_points(model)
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    for start in progress_bar(range(0, len(idx), batch_size), desc="residual stream", unit="batch", leave=False):
        with capture_points(model, list(points.values())) as cache:
            model(idx[start : start + batch_size].to(device))
        for name, module_name in points.items():
            chunks[name].append(cache[module_name].float().cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def position_analysis(
    model: Transformer, tokens: np.ndarray, starts: np.ndarray, ridge: float, batch_size: int = 8
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe and variance split of the residual stream over the windows tokens[starts + (0 .. seq_len-1)].

    Returns (variance, probe): variance has one row per (point, dimension) with columns point, point_index,
    dimension, position_share, token_share, position_share_adjusted, token_share_adjusted; probe has one row
    per point with point, point_index, r2 (held-out).
    """
    idx, _ = windows(tokens, starts, model.cfg.seq_len)  # (E, T)
    acts = residual_activations(model, idx, batch_size)
    variance_rows, probe_rows = [], []
    for point_index, (point, values) in enumerate(acts.items()):
        shares = variance_split(values, idx)
        frame = pd.DataFrame({key: value.numpy() for key, value in shares.items()})
        frame.insert(0, "dimension", np.arange(values.shape[-1]))
        frame.insert(0, "point_index", point_index)
        frame.insert(0, "point", point)
        variance_rows.append(frame)
        probe_rows.append({"point": point, "point_index": point_index, "r2": position_probe_r2(values, ridge)})
    return pd.concat(variance_rows, ignore_index=True), pd.DataFrame(probe_rows)


def analyse_checkpoint(
    model_path: str | Path, tokens_dir: str | Path, n_examples: int, ridge: float, seed: int, device: str = "auto"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """position_analysis of the trained model over n_examples seeded validation windows; the model runs on
    `device` (the stage passes train.device), the probe on the CPU."""
    if n_examples < 2:
        raise ConfigError("probe.n_examples", f"{n_examples}: the held-out probe needs at least 2 windows")
    model, _ = load_model(model_path, pick_device(device))
    seq_len = model.cfg.seq_len
    val = load_tokens(tokens_dir, "val")
    check_length(val, seq_len, "val")
    starts = example_starts(len(val), seq_len, n_examples, seed)
    return position_analysis(model, val, starts, ridge)
