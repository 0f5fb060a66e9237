"""Read attention out of a model, or change it, through forward hooks on its named HookPoints.

    with capture_attention(model) as cache:
        model(idx)
    cache[layer]  # (B, H, T, T) attention weights of that layer

Both context managers register hooks with ``register_forward_hook`` and remove them in ``finally``; while a
hook sits on ``hook_scores`` or ``hook_pattern`` the attention layer takes its explicit path, otherwise the
fused SDPA kernel. Nothing is monkeypatched and the trained weights are never touched.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from attnlab.model.transformer import CausalSelfAttention, Transformer

# An edit gets the (B, H, T, T) scores (or (B, H, T, Dh) head outputs) of one layer and returns new ones.
Edit = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def hooks(handles_factory: Callable[[], list]) -> Iterator[None]:
    handles = handles_factory()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_attention(
    model: Transformer, layers: list[int] | None = None, point: str = "hook_pattern", detach: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Collect each chosen layer's attention weights (point="hook_pattern") or scores ("hook_scores").

    The dict maps layer -> (B, H, T, T) tensor of the last forward pass.
    """
    cache: dict[int, torch.Tensor] = {}
    attn_layers = model.attention_layers
    chosen = range(len(attn_layers)) if layers is None else layers

    def make_hook(layer: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor):
            cache[layer] = output.detach() if detach else output

        return hook

    def register():
        return [getattr(attn_layers[i], point).register_forward_hook(make_hook(i)) for i in chosen]

    with hooks(register):
        yield cache


@contextlib.contextmanager
def capture_points(model: nn.Module, names: list[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Collect any HookPoints by module name, e.g. "blocks.0.hook_resid_post", "hook_embed"."""
    cache: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KeyError(f"no module named {name!r} in the model")

    def make_hook(name: str):
        def hook(module, inputs, output):
            cache[name] = output.detach() if detach else output

        return hook

    with hooks(lambda: [modules[n].register_forward_hook(make_hook(n)) for n in names]):
        yield cache


@contextlib.contextmanager
def edit_point(
    model: Transformer, edits: dict[int, Edit], point: str = "hook_scores"
) -> Iterator[None]:
    """Replace the activation at `point` of each layer in `edits` by edit(activation) during forward passes."""
    attn_layers = model.attention_layers
    for layer in edits:
        if not 0 <= layer < len(attn_layers):
            raise ValueError(f"layer {layer} does not exist (model has {len(attn_layers)} layers)")

    def make_hook(edit: Edit):
        def hook(module, inputs, output):
            return edit(output)

        return hook

    with hooks(lambda: [getattr(attn_layers[i], point).register_forward_hook(make_hook(e)) for i, e in edits.items()]):
        yield


@contextlib.contextmanager
def explicit_attention(model: Transformer) -> Iterator[None]:
    """Run every attention layer on the explicit path (e.g. a baseline comparable with edited runs)."""
    layers: list[CausalSelfAttention] = model.attention_layers
    before = [layer.force_explicit for layer in layers]
    for layer in layers:
        layer.force_explicit = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.force_explicit = flag
