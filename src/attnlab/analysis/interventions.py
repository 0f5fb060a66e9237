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
attention entropy, in one forward pass each batch); :func:`score_intervened_together` scores several sets in the
same passes, each batch stacked once per set (:func:`intervene_parts` edits each part under its own set);
:func:`mean_head_outputs` builds the MeanAblate table. The interventions stage's sweep over every setting is
attnlab.analysis.intervention_sweep.

Shapes: B batch, H heads, h chosen heads of a layer, T sequence, Dh head dimension, L layers, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch

from attnlab.analysis.capture import capture_points, edit_point, explicit_attention, hooks
from attnlab.analysis.stats import row_entropy_bits
from attnlab.model.scoring import Batch, score_parts
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
        kth = scores.amax(-1, keepdim=True) if self.k == 1 else torch.topk(scores, self.k, dim=-1).values[..., -1:]
        keep = scores >= kth  # (B, h, T, T): the k largest, and any key tied with the k-th
        # More than k kept only where ties straddle the k-th place (a finite k-th score: where it is -inf the
        # extra keys are masked ones, -inf either way): there the ties are broken
        if bool(((keep.sum(-1, keepdim=True) > self.k) & torch.isfinite(kth)).any()):
            keep = self._keep_breaking_ties(scores, kth)
        return scores.masked_fill(~keep, float("-inf"))  # (B, h, T, T)

    def _keep_breaking_ties(self, scores: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
        """Which keys stay: every score above the k-th, then the tied ones from the lowest key position on."""
        above = scores > kth  # (B, h, T, T) kept whatever the ties
        tied = scores == kth  # (B, h, T, T) candidates for the remaining places
        places = self.k - above.sum(-1, keepdim=True)  # (B, h, T, 1) how many tied keys still fit
        # A row with fewer than k allowed keys has kth = -inf: it keeps all of them, masked keys stay -inf.
        return above | (tied & (tied.cumsum(-1) <= places))  # ties go to the lowest key positions


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
    with intervene_parts(model, [edits]):
        yield


@contextlib.contextmanager
def intervene_parts(model: Transformer, edit_sets: Sequence[Mapping[HeadKey, Intervention]]) -> Iterator[None]:
    """intervene for batches that stack len(edit_sets) equal parts: of a batch of n * b windows, rows
    [r b, (r+1) b) run under edit_sets[r], so that several interventions share one forward pass."""
    plans = [_edits_by_layer(model, edits) for edits in edit_sets]  # per part: ({layer: edit}, {layer: edit})
    score_edits = _edit_parts([plan[0] for plan in plans])
    out_edits = _edit_parts([plan[1] for plan in plans])
    with edit_point(model, score_edits, "hook_scores"), edit_point(model, out_edits, "hook_head_out"):
        yield


def _edit_parts(parts: list[dict[int, Callable]]) -> dict[int, Callable]:
    """One edit per layer of a stacked batch: each part's own edit on its rows, the other rows as they are."""
    if len(parts) == 1:
        return parts[0]

    def stacked(edits: list[Callable | None]):
        def edit(x: torch.Tensor) -> torch.Tensor:  # (n b, ...)
            out = x.clone() if x.requires_grad else x  # outside autograd the parts are written in place
            b = x.shape[0] // len(edits)
            for r, part in enumerate(edits):
                if part is not None:  # each part reads its own rows only, before they are written
                    out[r * b : (r + 1) * b] = part(x[r * b : (r + 1) * b])
            return out

        return edit

    layers = sorted(set().union(*parts))
    return {layer: stacked([part.get(layer) for part in parts]) for layer in layers}


def _edits_by_layer(model: Transformer, edits: Mapping[HeadKey, Intervention]) -> tuple[dict, dict]:
    """The hook edits that realise `edits`: ({layer: scores edit}, {layer: head-output edit})."""
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
    return score_edits, out_edits


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


@dataclass(frozen=True)
class InterventionScore:
    loss: float  # mean next-token cross-entropy, nats/token
    mean_entropy_bits: float  # mean over layers, heads, examples and query positions of the attention entropy
    n_tokens: int
    position_loss: tuple[float, ...] = ()  # mean loss at each position of the batches' windows (Score's)
    window_loss: tuple[float, ...] = ()  # mean loss of each window, in batch order (Score's)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def score_intervened(
    model: Transformer, batches: list[Batch], edits: Mapping[HeadKey, Intervention] | None = None
) -> InterventionScore:
    """Loss (attnlab.model.scoring, the one scoring function) and mean attention entropy over fixed batches, on
    the explicit path. The attention weights are measured in the same forward pass that gives the loss."""
    return score_intervened_together(model, batches, [edits or {}])[0]


def score_intervened_together(
    model: Transformer, batches: list[Batch], edit_sets: Sequence[Mapping[HeadKey, Intervention]]
) -> list[InterventionScore]:
    """score_intervened of each set of edits, all in the same forward passes: each batch's windows are stacked
    once per set (part r runs under edit_sets[r], intervene_parts), so n sweep points cost one pass over n times
    the batch instead of n passes. Each part's loss and entropy are summed from its own rows: its score is
    score_intervened's for that set alone."""
    n = len(edit_sets)
    entropy_sums = torch.zeros(n, dtype=torch.float64, device=next(model.parameters()).device)  # (n,)
    n_rows = 0

    def add_entropy(module, inputs, pattern: torch.Tensor) -> None:  # pattern (n b, H, T, T), each layer's
        nonlocal n_rows
        bits = row_entropy_bits(pattern.float())  # (n b, H, T)
        entropy_sums.add_(bits.reshape(n, -1).sum(-1, dtype=torch.float64))  # each part's sum over (b, H, T)
        n_rows += pattern.shape[:-1].numel() // n

    stacked = ((x.repeat(n, 1), y.repeat(n, 1)) for x, y in batches)  # (n b, T) each
    layers = model.attention_layers
    with torch.no_grad(), explicit_attention(model), intervene_parts(model, edit_sets), \
            hooks(lambda: [layer.hook_pattern.register_forward_hook(add_entropy) for layer in layers]):
        scores = score_parts(model, stacked, n)
    return [InterventionScore(loss=score.loss, mean_entropy_bits=(entropy_sums[r] / n_rows).item(),
                              n_tokens=score.n_tokens, position_loss=score.position_loss,
                              window_loss=score.window_loss)
            for r, score in enumerate(scores)]


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


