"""What each head does: role scores of every head, in-context learning, and a causal check of the induction heads.

Each score is a mean of one head's attention weights A[b, q, k] (example b, query q, key k; rows causal, summing
to 1) over examples and the query positions named:

- induction (prefix matching), on sequences x of 2n tokens drawn at random, the n of the first half all
  different and the second half a copy of the first (x[n + j] = x[j]). The query at n + j holds a token whose
  previous occurrence is at j; an induction head attends to the token after it, j + 1, the one that comes next:
      induction = mean_{b, j = 0..n-1} A[b, n + j, j + 1]
- duplicate token, on the same sequences: attention to the previous occurrence itself,
      duplicate = mean_{b, j = 0..n-1} A[b, n + j, j]
- previous token, on validation text of T tokens (attention_stats's val examples): the key one back,
      previous_token = mean_{b, q = 1..T-1} A[b, q, q - 1]
- sink, on the same text: attention to the first key, sink = mean_{b, q = 1..T-1} A[b, q, 0]; the sink rate is
  the share of the model's heads whose sink score exceeds SINK_THRESHOLD = 0.3, the epsilon of Gu et al. (2025,
  "When Attention Sink Emerges in Language Models").

Uniform attention (A[q, k] = 1 / (q + 1)) scores (H_2n - H_n) / n as induction and as duplicate, and
(H_T - 1) / (T - 1) as previous token and as sink (H_m = 1 + 1/2 + ... + 1/m): uniform_scores. Every score is a
diagonal of A (torch.diagonal), so nothing loops over positions or heads.

In-context learning, in nats (attnlab.model.scoring, fp32):
- repeat_icl = loss on the second copy - loss on the first: the targets x[n+1 .. 2n-1] against x[1 .. n-1], each
  predicted from everything before it (x[n] is left out: nothing before it says what it is). Random tokens cannot
  be predicted from frequencies, so a copying model's second copy scores far below its first.
- icl_score (Olsson et al., 2022, "In-context Learning and Induction Heads": the loss at the 500th token minus the
  loss at the 50th) on the validation text: the mean loss of the targets with ICL_BANDS[1] x T tokens of context
  minus that with ICL_BANDS[0] x T, bands around 0.9 T and 0.1 T. Negative when later tokens gain from the context.

The causal check (ablation_check): mean-ablating the top_k heads by induction score (attnlab.analysis.interventions,
MeanAblate with each head's mean output on the repeated sequences) should raise the second copy's loss far more
than the first's, and more than ablating as many other heads of the same layers, those with the lowest induction
scores.

The random sequences come from numpy's generator seeded with analysis.seed, the text is attention_stats's val
examples (also analysis.seed), so the stage measures the same tokens whatever `seed` trained the model.

Shapes: N sequences, B batch, L layers, H heads, T tokens per sequence, n = T / 2 for the repeated sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.interventions import MeanAblate, mean_head_outputs, score_intervened
from attnlab.analysis.stats import stage_examples
from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import atomic_path
from attnlab.core.params import Params
from attnlab.model.checkpoint import load_model
from attnlab.model.scoring import Batch, Score, score_batches
from attnlab.model.transformer import Transformer

ROLES = ("induction", "duplicate", "previous_token", "sink")
REPEATED = "repeated random tokens"  # what the induction and duplicate scores are measured on
TEXT = "validation text"  # ... and the previous-token and sink scores
MEASURED_ON = {"induction": REPEATED, "duplicate": REPEATED, "previous_token": TEXT, "sink": TEXT}
SINK_THRESHOLD = 0.3  # Gu et al.'s epsilon: a head with more mean attention on the first key is a sink head
INDUCTION_THRESHOLD = 0.1  # the report calls a head with a higher induction score an induction head
ICL_BANDS = ((0.05, 0.15), (0.85, 0.95))  # shares of T: the context lengths of "early" and "late" targets

# ------------------------------------------------------------------------------------------ the scores


def _check_repeated(pattern: torch.Tensor, half: int) -> None:
    if pattern.shape[-1] != 2 * half or pattern.shape[-2] != 2 * half or half < 1:
        raise ValueError(f"attention of shape {tuple(pattern.shape)} is not of a sequence repeated once "
                         f"(2 x {half} queries and keys)")


def induction_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """mean_j A[n + j, j + 1] over the second half's queries. pattern (..., 2n, 2n) -> (...)."""
    _check_repeated(pattern, half)
    # offset -(n - 1): the entries (q, q - n + 1) for q = n - 1 .. 2n - 1; the first is a query of the first half
    return torch.diagonal(pattern, offset=-(half - 1), dim1=-2, dim2=-1)[..., 1:].mean(-1)


def duplicate_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """mean_j A[n + j, j] over the second half's queries. pattern (..., 2n, 2n) -> (...)."""
    _check_repeated(pattern, half)
    return torch.diagonal(pattern, offset=-half, dim1=-2, dim2=-1).mean(-1)  # (q, q - n) for q = n .. 2n - 1


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """mean_{q >= 1} A[q, q - 1]. pattern (..., T, T) -> (...)."""
    return torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1).mean(-1)


def sink_score(pattern: torch.Tensor) -> torch.Tensor:
    """mean_{q >= 1} A[q, 0]: the weight on the first key. pattern (..., T, T) -> (...)."""
    return pattern[..., 1:, 0].mean(-1)


def sink_rate(sink: np.ndarray, threshold: float = SINK_THRESHOLD) -> float:
    """The share of heads whose sink score exceeds the threshold. sink: (L, H)."""
    return float((np.asarray(sink) > threshold).mean())


def uniform_scores(half: int, seq_len: int) -> dict[str, float]:
    """Each role's score under uniform attention, in closed form: repeated sequences of 2 x half, text of seq_len."""
    def harmonic(m: int) -> float:
        return math.fsum(1.0 / i for i in range(1, m + 1))

    repeated = (harmonic(2 * half) - harmonic(half)) / half
    text = (harmonic(seq_len) - 1.0) / (seq_len - 1)
    return {"induction": repeated, "duplicate": repeated, "previous_token": text, "sink": text}


# ------------------------------------------------------------------------------------------ the inputs


def repeated_random_tokens(n_sequences: int, half: int, vocab_size: int, seed: int) -> torch.Tensor:
    """N sequences of 2 x half token ids: half ids drawn at random without repeats, then the same again.
    (N, 2 half) int64. Raises ValueError when the vocabulary has fewer than half ids."""
    if not 1 <= half <= vocab_size:
        raise ValueError(f"cannot draw {half} different token ids from a vocabulary of {vocab_size}")
    rng = np.random.default_rng(seed)
    first = rng.random((n_sequences, vocab_size)).argsort(axis=1)[:, :half]  # (N, half): a random subset, in order
    return torch.from_numpy(np.concatenate([first, first], axis=1).astype(np.int64))  # (N, 2 half)


def repeat_half(model: Transformer) -> int:
    """n of the model's repeated sequences: half its window, at most its vocabulary."""
    return min(model.cfg.seq_len // 2, model.vocab_size)


def sequence_batches(sequences: torch.Tensor, batch_size: int, device) -> list[Batch]:
    """Next-token batches of whole sequences (N, T): inputs (B, T - 1) and targets (B, T - 1), on the device."""
    return [(chunk[:, :-1].to(device), chunk[:, 1:].to(device)) for chunk in sequences.split(batch_size)]


# -------------------------------------------------------------------------------------- running the model

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # (B, H, T, T) -> (B, H)


@torch.no_grad()
def pattern_scores(model: Transformer, sequences: torch.Tensor, batch_size: int,
                   scores: dict[str, ScoreFn]) -> dict[str, np.ndarray]:
    """Each score's mean over the sequences (N, T), per layer and head: name -> (L, H) float64."""
    device = next(model.parameters()).device
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {name: torch.zeros(L, H, dtype=torch.float64, device=device) for name in scores}
    for batch in sequences.split(batch_size):
        with capture_attention(model) as cache:
            model(batch.to(device))
        for layer in range(L):
            pattern = cache.pop(layer).double()  # (B, H, T, T)
            for name, fn in scores.items():
                sums[name][layer] += fn(pattern).sum(0)  # (H,)
    return {name: (total / len(sequences)).cpu().numpy() for name, total in sums.items()}


def band_positions(seq_len: int, band: tuple[float, float]) -> slice:
    """The positions p (target p + 1, predicted with p + 1 tokens of context) whose context length lies in
    [round(band[0] T), round(band[1] T)), at least one, at most position T - 2."""
    low = min(max(1, round(band[0] * seq_len)), seq_len - 1)
    high = min(max(low + 1, round(band[1] * seq_len)), seq_len)
    return slice(low - 1, high - 1)


def band_loss(score_losses: tuple[float, ...], positions: slice) -> float:
    return float(np.mean(np.asarray(score_losses, dtype=np.float64)[positions]))


def copy_losses(position_loss: tuple[float, ...], half: int) -> tuple[float, float]:
    """(first copy, second copy) mean loss of repeated sequences, from the per-position loss of their
    next-token batches (position p predicts token p + 1): positions 0 .. n-2 and n .. 2n-2."""
    losses = np.asarray(position_loss, dtype=np.float64)
    return float(losses[: half - 1].mean()), float(losses[half : 2 * half - 1].mean())


@dataclass(frozen=True)
class RoleScores:
    """One model's role scores and in-context learning (module docstring)."""

    heads: dict[str, np.ndarray]  # role -> (L, H) float64
    repeat_losses: tuple[float, float]  # (first copy, second copy), nats
    val_loss: float  # mean loss on the validation text
    val_band_losses: tuple[float, float]  # (early, late), nats
    half: int
    text_len: int

    @property
    def repeat_icl(self) -> float:
        return self.repeat_losses[1] - self.repeat_losses[0]

    @property
    def icl_score(self) -> float:
        return self.val_band_losses[1] - self.val_band_losses[0]


def role_scores(model: Transformer, repeats: torch.Tensor, text: torch.Tensor, batch_size: int) -> RoleScores:
    """Every role score of every head, on repeated sequences (N, 2n) and validation text (M, T), and the losses
    of in-context learning on both."""
    half = repeats.shape[1] // 2
    on_repeats = pattern_scores(model, repeats, batch_size, {
        "induction": lambda p: induction_score(p, half), "duplicate": lambda p: duplicate_score(p, half)})
    on_text = pattern_scores(model, text, batch_size, {"previous_token": previous_token_score, "sink": sink_score})
    device = next(model.parameters()).device
    repeat_score = score_batches(model, sequence_batches(repeats, batch_size, device))
    text_score: Score = score_batches(model, sequence_batches(text, batch_size, device))
    T = text.shape[1]
    early, late = (band_loss(text_score.position_loss, band_positions(T, band)) for band in ICL_BANDS)
    return RoleScores(heads={**on_repeats, **on_text}, repeat_losses=copy_losses(repeat_score.position_loss, half),
                      val_loss=text_score.loss, val_band_losses=(early, late), half=half, text_len=T)


# ----------------------------------------------------------------------------------------- the causal check


def head_key(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def ablation_heads(induction: np.ndarray, top_k: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The top_k heads by induction score (ties: lower layer, then head, first), and as control as many other
    heads of each of their layers, those with the lowest induction scores (fewer where a layer has no more)."""
    L, H = induction.shape
    order = np.lexsort((np.arange(L * H), -induction.ravel()))  # by score, descending; ties by index
    top = [divmod(int(i), H) for i in order[:top_k]]
    control = []
    for layer in sorted({layer for layer, _ in top}):
        wanted = sum(1 for lay, _ in top if lay == layer)
        others = [h for h in np.argsort(induction[layer], kind="stable") if (layer, int(h)) not in top]
        control += [(layer, int(h)) for h in others[:wanted]]
    return top, control


def ablation_check(model: Transformer, repeats: torch.Tensor, induction: np.ndarray, top_k: int,
                   batch_size: int) -> dict:
    """Mean-ablate the top induction heads, then the control heads (ablation_heads), on the repeated sequences:
    the loss of each copy with and without, and how much each ablation raises it (nats)."""
    device = next(model.parameters()).device
    half = repeats.shape[1] // 2
    batches = sequence_batches(repeats, batch_size, device)
    ablate = MeanAblate(mean_head_outputs(model, batches))  # (L, H, Dh) each head's mean on these sequences
    top, control = ablation_heads(induction, top_k)
    runs = {"baseline": {}, "induction_heads_ablated": {key: ablate for key in top},
            "control_heads_ablated": {key: ablate for key in control}}
    losses = {name: copy_losses(score_intervened(model, batches, edits).position_loss, half)
              for name, edits in runs.items()}
    rise = {copy: {"induction_heads": losses["induction_heads_ablated"][i] - losses["baseline"][i],
                   "control_heads": losses["control_heads_ablated"][i] - losses["baseline"][i]}
            for i, copy in enumerate(("first_copy", "second_copy"))}
    induction_rise = rise["second_copy"]["induction_heads"]
    return {
        "heads": [head_key(*key) for key in top],
        "control_heads": [head_key(*key) for key in control],
        "loss_first_copy": {name: first for name, (first, _) in losses.items()},
        "loss_second_copy": {name: second for name, (_, second) in losses.items()},
        "rise_first_copy": rise["first_copy"],
        "rise_second_copy": rise["second_copy"],
        "second_copy_rises_more_than_first": induction_rise > rise["first_copy"]["induction_heads"],
        "more_than_control": induction_rise > rise["second_copy"]["control_heads"],
    }


# ----------------------------------------------------------------------------------------- outputs


def roles_table(roles: RoleScores, n_sequences: int, n_examples: int) -> pd.DataFrame:
    """head_roles.parquet: one row per (layer, head, role): score, measured_on, n_sequences, tokens per sequence."""
    L, H = roles.heads["induction"].shape
    layer, head = np.meshgrid(np.arange(L, dtype=np.int16), np.arange(H, dtype=np.int16), indexing="ij")
    frames = [pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(), "role": role, "score": roles.heads[role].ravel(),
        "measured_on": MEASURED_ON[role],
        "n_sequences": n_sequences if MEASURED_ON[role] == REPEATED else n_examples,
        "seq_len": 2 * roles.half if MEASURED_ON[role] == REPEATED else roles.text_len,
    }) for role in ROLES]  # fmt: skip
    table = pd.concat(frames, ignore_index=True)
    for column in ("role", "measured_on"):
        table[column] = table[column].astype("category")
    return table


def roles_metrics(roles: RoleScores, n_sequences: int, n_examples: int) -> dict:
    """head_roles.json without the ablation: sizes, each role's strongest head, the sink rate, the in-context
    learning losses, uniform attention's scores for scale, and every head's scores."""
    L, H = roles.heads["induction"].shape
    strongest = {}
    for role in ROLES:
        layer, head = np.unravel_index(int(np.argmax(roles.heads[role])), (L, H))
        strongest[role] = {"head": head_key(int(layer), int(head)), "score": float(roles.heads[role][layer, head])}
    early, late = (band_positions(roles.text_len, band) for band in ICL_BANDS)
    induction = roles.heads["induction"]  # (L, H)
    return {
        "repeated": {"n_sequences": n_sequences, "half_len": roles.half, "seq_len": 2 * roles.half},
        "text": {"n_examples": n_examples, "seq_len": roles.text_len},
        "strongest": strongest,
        "induction_threshold": INDUCTION_THRESHOLD,
        "induction_heads": [head_key(int(l), int(h)) for l, h in np.argwhere(induction > INDUCTION_THRESHOLD)],
        "sink_threshold": SINK_THRESHOLD,
        "sink_rate": sink_rate(roles.heads["sink"]),
        "icl": {
            "repeat_first_copy_loss": roles.repeat_losses[0], "repeat_second_copy_loss": roles.repeat_losses[1],
            "repeat_icl_nats": roles.repeat_icl, "val_loss": roles.val_loss,
            "val_early_loss": roles.val_band_losses[0], "val_late_loss": roles.val_band_losses[1],
            "icl_score_nats": roles.icl_score,
            "early_context": [early.start + 1, early.stop], "late_context": [late.start + 1, late.stop],
        },
        "uniform": uniform_scores(roles.half, roles.text_len),
        "heads": {head_key(l, h): {role: float(roles.heads[role][l, h]) for role in ROLES}
                  for l in range(L) for h in range(H)},
    }  # fmt: skip


def head_roles(params: Params, model_path: str | Path, tokens_dir: str | Path, out_table: str | Path) -> dict:
    """The head_roles stage: writes out_table (head_roles.parquet); returns {"metrics", "table"}.

    ConfigError naming head_roles.top_k when the model has too few heads for it and a control."""
    cfg = params.head_roles
    model, _ = load_model(model_path, pick_device(params.train.device))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if cfg.top_k >= L * H:
        raise ConfigError("head_roles.top_k", f"{cfg.top_k} leaves no other head to ablate as a control: the model "
                          f"in {model_path} has {L} layers x {H} heads")
    text = stage_examples(params, tokens_dir, model, splits=("val",))[1]["val"]  # (M, T)
    repeats = repeated_random_tokens(cfg.n_sequences, repeat_half(model), model.vocab_size, params.analysis.seed)
    roles = role_scores(model, repeats, text, cfg.batch_size)
    metrics = roles_metrics(roles, len(repeats), len(text))
    metrics["ablation"] = ablation_check(model, repeats, roles.heads["induction"], cfg.top_k, cfg.batch_size)
    table = roles_table(roles, len(repeats), len(text))
    with atomic_path(out_table) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, compression="zstd")
    return {"metrics": metrics, "table": table}
