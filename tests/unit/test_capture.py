"""capture.py: attention read out through HookPoints matches the loop reference and leaves no hooks behind."""

from __future__ import annotations

import pytest
import torch

from builders import tiny_model
from attention_reference import loop_attention

from attnlab.analysis.capture import capture_attention, capture_points, edit_point, explicit_attention
from attnlab.model.transformer import HookPoint, Transformer, causal_mask

VOCAB = 53


def make_model(seed: int = 0, **overrides) -> Transformer:
    return tiny_model(VOCAB, seed, **{"n_layers": 3, "seq_len": 32, **overrides})


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def n_hooks(model: Transformer) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules() if isinstance(m, HookPoint))


def on_explicit_path(model: Transformer) -> list[bool]:
    return [layer.explicit for layer in model.attention_layers]


# ------------------------------------------------------------------------------------------------ capture


@pytest.mark.parametrize("pe", ["rope", "none", "learned"])
def test_capture_gives_causal_probability_rows_per_layer(pe):
    model = make_model(pe=pe)
    idx = tokens(2, 20)
    with torch.no_grad():
        plain = model(idx)
        with capture_attention(model) as cache:
            assert on_explicit_path(model) == [True] * 3
            captured = model(idx)
    assert sorted(cache) == [0, 1, 2]
    upper = torch.ones(20, 20, dtype=torch.bool).triu(diagonal=1)  # key_pos > position
    for layer, pattern in cache.items():
        assert pattern.shape == (2, 4, 20, 20)  # (B, H, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 20), atol=1e-6, rtol=0)
        assert torch.all(pattern[..., upper] == 0)
        assert torch.all(pattern[..., ~upper] > 0)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)  # capturing changes nothing
    assert n_hooks(model) == 0 and on_explicit_path(model) == [False] * 3


@pytest.mark.parametrize(("pe", "norm"), [("rope", "pre"), ("learned", "post")])
def test_attend_gives_every_layers_attention_of_a_full_forward_and_runs_nothing_after_the_last(pe, norm):
    model = make_model(pe=pe, norm=norm)
    idx = tokens(2, 20)
    after_last = []
    model.blocks[-1].mlp.register_forward_hook(lambda *args: after_last.append("mlp"))
    model.blocks[-1].hook_resid_post.register_forward_hook(lambda *args: after_last.append("resid_post"))
    with torch.no_grad(), capture_attention(model, point="hook_scores") as full:
        model(idx)
    assert after_last == ["mlp", "resid_post"]
    after_last.clear()
    with torch.no_grad(), capture_attention(model, point="hook_scores") as attended:
        assert model.attend(idx) is None
    assert after_last == [] and sorted(attended) == sorted(full) == [0, 1, 2]
    for layer in full:
        assert torch.equal(attended[layer], full[layer]), layer


def test_captured_pattern_matches_the_loop_reference():
    model = make_model(pe="rope", d_model=16, n_heads=2, n_layers=2).double()
    idx = tokens(2, 7)
    with torch.no_grad(), capture_attention(model) as patterns, capture_points(
        model, ["hook_embed", "blocks.0.hook_resid_post"]
    ) as points:
        model(idx)
    for layer, layer_input in [(0, points["hook_embed"]), (1, points["blocks.0.hook_resid_post"])]:
        block = model.blocks[layer]
        attn_input = block.ln1(layer_input) if block.pre_norm else layer_input  # what the attention reads
        _, expected = loop_attention(block.attn, attn_input)  # (B, H, T, T)
        torch.testing.assert_close(patterns[layer], expected, atol=1e-6, rtol=1e-6)


def test_capture_chosen_layers_and_scores():
    model = make_model()
    idx = tokens(1, 12)
    with torch.no_grad():
        with capture_attention(model, layers=[1]) as patterns:
            model(idx)
        with capture_attention(model, layers=[1], point="hook_scores") as scores:
            model(idx)
    assert list(patterns) == [1] and list(scores) == [1]
    upper = torch.ones(12, 12, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(scores[1][..., upper] == float("-inf"))
    torch.testing.assert_close(torch.softmax(scores[1], dim=-1), patterns[1])


def test_capture_detaches_unless_asked():
    model = make_model()
    idx = tokens(1, 8)
    with capture_attention(model, layers=[0]) as detached:
        model(idx)
    assert not detached[0].requires_grad
    with capture_attention(model, layers=[0], detach=False) as attached:
        model(idx)
    attached[0][..., 0].sum().backward()  # gradients flow back into the weights through the captured pattern
    assert model.blocks[0].attn.qkv.weight.grad[: model.cfg.d_model].abs().sum() > 0  # the query rows


def test_capture_points_names_are_checked():
    model = make_model()
    with pytest.raises(KeyError, match="blocks.7.hook_resid_post"):
        with capture_points(model, ["blocks.7.hook_resid_post"]):
            pass
    with torch.no_grad(), capture_points(model, ["blocks.2.hook_resid_post", "blocks.0.attn.hook_head_out"]) as cache:
        model(tokens(2, 9))
    assert cache["blocks.2.hook_resid_post"].shape == (2, 9, 32)  # (B, T, D)
    assert cache["blocks.0.attn.hook_head_out"].shape == (2, 4, 9, 8)  # (B, H, T, Dh)
    assert n_hooks(model) == 0


# ------------------------------------------------------------------------------------------------- edits


def test_identity_edit_changes_nothing_and_a_hard_edit_is_seen_downstream():
    model = make_model()
    idx = tokens(2, 10)
    with torch.no_grad():
        with explicit_attention(model):
            baseline = model(idx)
        with explicit_attention(model), edit_point(model, {0: lambda scores: scores}):
            same = model(idx)  # the same explicit path everywhere, so bit for bit the same

        def attend_to_first_key(scores: torch.Tensor) -> torch.Tensor:  # (B, H, T, T) -> all weight on key 0
            edited = torch.full_like(scores, float("-inf"))
            edited[..., 0] = 0.0
            return edited

        with edit_point(model, {1: attend_to_first_key}), capture_attention(model) as cache:
            edited = model(idx)
    torch.testing.assert_close(same, baseline, atol=0, rtol=0)
    one_hot = torch.zeros(2, 4, 10, 10)
    one_hot[..., 0] = 1.0
    assert torch.equal(cache[1], one_hot)
    assert not torch.allclose(cache[0], cache[1])  # layer 0 is untouched
    assert (edited - baseline).abs().max() > 1e-4
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        with edit_point(model, {3: lambda s: s}):
            pass


# ------------------------------------------------------------------------------------------ hook cleanup


@pytest.mark.parametrize(
    "context",
    [
        lambda m: capture_attention(m),
        lambda m: capture_attention(m, layers=[0, 2], point="hook_scores"),
        lambda m: capture_points(m, ["hook_embed", "blocks.1.hook_resid_post"]),
        lambda m: edit_point(m, {1: lambda s: s * 0.5}),
        lambda m: explicit_attention(m),
    ],
    ids=["capture", "capture-scores", "capture-points", "edit", "explicit"],
)
def test_hooks_are_removed_after_the_block_also_on_error(context):
    model = make_model()
    idx = tokens(1, 6)
    with context(model):
        model(idx)
        assert n_hooks(model) > 0 or all(on_explicit_path(model))
    assert n_hooks(model) == 0 and on_explicit_path(model) == [False] * 3

    with pytest.raises(RuntimeError, match="boom"):
        with context(model):
            model(idx)
            raise RuntimeError("boom")
    assert n_hooks(model) == 0 and on_explicit_path(model) == [False] * 3


def test_nested_explicit_attention_restores_the_outer_setting():
    model = make_model()
    model.blocks[1].attn.force_explicit = True
    with explicit_attention(model):
        assert on_explicit_path(model) == [True] * 3
    assert on_explicit_path(model) == [False, True, False]


def test_the_causal_mask_is_the_closed_form_made_once_and_never_written():
    mask = causal_mask(5, torch.float32, torch.device("cpu"))  # (1, T, T)
    expected = torch.tensor([[0.0 if key <= query else float("-inf") for key in range(5)] for query in range(5)])
    assert torch.equal(mask, expected[None])
    model, idx = make_model(seq_len=5), tokens(2, 5)
    with torch.no_grad(), explicit_attention(model):
        model(idx)
    assert causal_mask(5, torch.float32, torch.device("cpu")) is mask and torch.equal(mask, expected[None])
