"""Change what chosen heads do during a forward pass, without touching the weights: a small, typed API.

    with intervene(model, {(0, 1): Temperature(2.0), (1, 3): TopK(4), (1, 0): MeanAblate(means)}):
        logits = model(idx)

Each intervention is a frozen dataclass, applied to the heads named by the (layer, head) keys:

- ``Uniform()``: every allowed key gets the same score, so query position t attends 1/(t+1) to keys 0..t and
  the head's output becomes the running mean of V.
- ``Temperature(tau)``: scores / tau before the softmax (tau -> 0 approaches hard attention, tau = 1 is the model).
- ``TopK(k)``: keep the k largest scores of each query row, the others become -inf; ties go to the lowest
  key position; k >= t + 1 keeps every allowed key.
- ``MeanAblate(means)``: replace the head's output (before the output projection) with its mean over
  positions and examples, ``means[layer, head]``, from :func:`mean_head_outputs` on the train split.

The softmax interventions edit the pre-softmax scores on ``hook_scores`` (entries masked by the causal mask are
-inf and stay -inf); mean-ablation edits ``hook_head_out``. Both go through attnlab.analysis.capture.edit_point, so
hooks are removed when the block exits, also on error. Nothing is monkeypatched.

:func:`score_intervened` scores a model under a set of edits (loss through attnlab.model.scoring and the mean
attention entropy, in one forward pass each batch); :func:`mean_head_outputs` builds the MeanAblate table. The
interventions stage's sweep over every setting is attnlab.analysis.intervention_sweep.

Shapes: B batch, H heads, h chosen heads of a layer, T sequence, Dh head dimension, L layers, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import torch

from attnlab.analysis.capture import capture_attention, capture_points, edit_point, explicit_attention
from attnlab.model.scoring import Batch, score_batches
from attnlab.model.transformer import Transformer

# --------------------------------------------------------------------------------------- the interventions


@dataclass(frozen=True)
class Uniform:
    """All allowed keys get score 0: softmax gives 1/(t+1) to each of keys 0..t."""

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, h, T, T), -inf where masked
        return torch.where(torch.isneginf(scores), scores, torch.zeros_like(scores))  # (B, h, T, T)


@dataclass(frozen=True)
class Temperature:
    """Scores divided by tau (> 0); -inf / tau stays -inf."""

    tau: float

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"Temperature.tau must be > 0, got {self.tau}")

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.tau  # (B, h, T, T)


@dataclass(frozen=True)
class TopK:
    """Keep the k largest scores per query row (lowest key position wins ties), set the others to -inf."""

    k: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"TopK.k must be an integer >= 1, got {self.k!r}")

    def edit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, h, T, T), -inf where masked
        if self.k >= scores.shape[-1]:
            return scores  # every allowed key is among the k largest
        kth = torch.topk(scores, self.k, dim=-1).values[..., -1:]  # (B, h, T, 1) the k-th largest score per row
        above = scores > kth  # (B, h, T, T) kept whatever the ties
        tied = scores == kth  # (B, h, T, T) candidates for the remaining places
        places = self.k - above.sum(-1, keepdim=True)  # (B, h, T, 1) how many tied keys still fit
        keep = above | (tied & (tied.cumsum(-1) <= places))  # ties go to the lowest key positions
        # A row with fewer than k allowed keys has kth = -inf: it keeps all of them, masked keys stay -inf.
        return scores.masked_fill(~keep, float("-inf"))  # (B, h, T, T)


@dataclass(frozen=True, eq=False)  # eq=False: compared (and grouped) by identity, tensors have no plain ==
class MeanAblate:
    """Replace the head's output with means[layer, head]; means: (L, H, Dh), e.g. from :func:`mean_head_outputs`."""

    means: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.means, torch.Tensor) or self.means.dim() != 3:
            raise ValueError("MeanAblate.means must be a (n_layers, n_heads, d_head) tensor")


ScoreIntervention = Union[Uniform, Temperature, TopK]
Intervention = Union[Uniform, Temperature, TopK, MeanAblate]
HeadKey = tuple[int, int]  # (layer, head)


@contextlib.contextmanager
def intervene(model: Transformer, edits: Mapping[HeadKey, Intervention]) -> Iterator[None]:
    """Apply each intervention to its (layer, head) during forward passes inside the block.

    Heads of one layer that share an intervention are edited together, in one indexed operation.
    Hooks are registered on entry and removed on exit; the model's weights are never written.
    """
    cfg = model.cfg
    score_groups: dict[int, dict[ScoreIntervention, list[int]]] = {}  # layer -> intervention -> heads
    out_groups: dict[int, dict[MeanAblate, list[int]]] = {}
    for (layer, head), intervention in edits.items():
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(
                f"(layer={layer}, head={head}) does not exist: the model has {cfg.n_layers} layers of "
                f"{cfg.n_heads} heads"
            )
        if isinstance(intervention, MeanAblate):
            expected = (cfg.n_layers, cfg.n_heads, cfg.d_head)
            if tuple(intervention.means.shape) != expected:
                raise ValueError(f"MeanAblate.means has shape {tuple(intervention.means.shape)}, expected {expected}")
            out_groups.setdefault(layer, {}).setdefault(intervention, []).append(head)
        elif isinstance(intervention, (Uniform, Temperature, TopK)):
            score_groups.setdefault(layer, {}).setdefault(intervention, []).append(head)
        else:
            raise TypeError(f"unknown intervention {intervention!r} for (layer={layer}, head={head})")

    device = next(model.parameters()).device
    score_edits = {layer: _score_edit(groups) for layer, groups in score_groups.items()}
    out_edits = {layer: _mean_edit(layer, groups, device) for layer, groups in out_groups.items()}
    with edit_point(model, score_edits, "hook_scores"), edit_point(model, out_edits, "hook_head_out"):
        yield


def _score_edit(groups: dict[ScoreIntervention, list[int]]):
    def edit(scores: torch.Tensor) -> torch.Tensor:
        if len(groups) == 1:
            (intervention, heads), = groups.items()
            if sorted(heads) == list(range(scores.shape[1])):  # every head alike: no gather/scatter needed
                return intervention.edit_scores(scores)  # (B, H, T, T)
        scores = scores.clone()  # (B, H, T, T)
        for intervention, heads in groups.items():  # one step per distinct intervention, not per head
            scores[:, heads] = intervention.edit_scores(scores[:, heads])  # (B, h, T, T)
        return scores

    return edit


def _mean_edit(layer: int, groups: dict[MeanAblate, list[int]], device: torch.device):
    means = [(ablate.means[layer, heads].to(device), heads) for ablate, heads in groups.items()]  # (h, Dh) each

    def edit(head_out: torch.Tensor) -> torch.Tensor:
        head_out = head_out.clone()  # (B, H, T, Dh)
        for mean, heads in means:
            head_out[:, heads] = mean.to(head_out.dtype)[None, :, None, :]  # (1, h, 1, Dh) broadcast over B, T
        return head_out

    return edit


# ----------------------------------------------------------------------------------- measuring on batches


def entropy_bits(pattern: torch.Tensor) -> torch.Tensor:
    """Entropy of each attention row in bits, -sum_j p_j log2 p_j with 0 log 0 = 0. (..., T, T) -> (..., T)."""
    return -torch.special.xlogy(pattern, pattern).sum(-1) / math.log(2.0)


@dataclass(frozen=True)
class InterventionScore:
    loss: float  # mean next-token cross-entropy, nats/token
    mean_entropy_bits: float  # mean over layers, heads, examples and query positions of the attention entropy
    n_tokens: int
    position_loss: tuple[float, ...] = ()  # mean loss at each position of the batches' windows (Score's)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def score_intervened(
    model: Transformer, batches: list[Batch], edits: Mapping[HeadKey, Intervention] | None = None
) -> InterventionScore:
    """Loss (attnlab.model.scoring.score_batches, the one scoring function) and mean attention entropy over fixed
    batches, on the explicit path. The attention weights are captured in the same forward pass that gives the
    loss."""
    device = next(model.parameters()).device
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_rows = 0
    with torch.no_grad(), explicit_attention(model), intervene(model, edits or {}), \
            capture_attention(model) as patterns:

        def add_entropy() -> None:
            nonlocal entropy_sum, n_rows
            for pattern in patterns.values():  # (B, H, T, T) per layer
                entropy_sum += entropy_bits(pattern).sum(dtype=torch.float64)  # over (B, H, T)
                n_rows += pattern.shape[:-1].numel()

        score = score_batches(model, batches, after_forward=add_entropy)
    return InterventionScore(loss=score.loss, mean_entropy_bits=(entropy_sum / n_rows).item(), n_tokens=score.n_tokens,
                             position_loss=score.position_loss)


@torch.no_grad()
def mean_head_outputs(model: Transformer, batches: list[Batch]) -> torch.Tensor:
    """Each head's mean output over positions and examples: (L, H, Dh) float32 (the MeanAblate table)."""
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_head_out" for layer in range(L)]
    device = next(model.parameters()).device
    sums = torch.zeros(L, model.cfg.n_heads, model.cfg.d_head, dtype=torch.float64, device=device)  # (L, H, Dh)
    count = 0
    with explicit_attention(model), capture_points(model, names) as cache:
        for inputs, _ in batches:
            model(inputs)
            for layer, name in enumerate(names):
                sums[layer] += cache[name].double().sum(dim=(0, 2))  # (B, H, T, Dh) -> (H, Dh)
            count += inputs.numel()  # B * T positions
    return (sums / count).float()


