"""Head roles (attnlab.analysis.head_roles): every score on hand-built attention patterns whose score is known in
closed form, the repeated-sequence builder, the context bands and copy losses, the choice of ablated heads, and
the stage end to end on tiny models (one with exactly uniform attention, whose scores are the closed forms)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from builders import run_stage, write_model, write_params, write_tokens

from attnlab.analysis import head_roles as roles
from attnlab.analysis.capture import capture_attention
from attnlab.core.errors import ConfigError
from attnlab.core.params import load_params
from attnlab.model.checkpoint import load_model
from attnlab.model.scoring import score_batches

HALF = 6
T = 2 * HALF


def one_hot_pattern(keys: list[int]) -> torch.Tensor:
    """(T, T) attention with query q putting all its weight on key keys[q] (<= q)."""
    pattern = torch.zeros(len(keys), len(keys), dtype=torch.float64)
    for q, k in enumerate(keys):
        assert 0 <= k <= q
        pattern[q, k] = 1.0
    return pattern


def uniform_pattern(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.float64).tril() / torch.arange(1, n + 1, dtype=torch.float64)[:, None]


PREVIOUS = one_hot_pattern([0] + [q - 1 for q in range(1, T)])  # every query on the key one back
INDUCTION = one_hot_pattern([q for q in range(HALF)] + [q - HALF + 1 for q in range(HALF, T)])  # first half: itself
DUPLICATE = one_hot_pattern([q for q in range(HALF)] + [q - HALF for q in range(HALF, T)])
FIRST = one_hot_pattern([0] * T)


def scores_of(pattern: torch.Tensor) -> dict[str, float]:
    return {"induction": roles.induction_score(pattern, HALF).item(),
            "duplicate": roles.duplicate_score(pattern, HALF).item(),
            "previous_token": roles.previous_token_score(pattern).item(), "sink": roles.sink_score(pattern).item()}


@pytest.mark.parametrize("pattern, expected", [
    (PREVIOUS, {"induction": 0.0, "duplicate": 0.0, "previous_token": 1.0, "sink": 1 / (T - 1)}),
    (INDUCTION, {"induction": 1.0, "duplicate": 0.0, "previous_token": 0.0, "sink": 0.0}),
    (DUPLICATE, {"induction": 0.0, "duplicate": 1.0, "previous_token": 0.0, "sink": 1 / (T - 1)}),
    (FIRST, {"induction": 0.0, "duplicate": 1 / HALF, "previous_token": 1 / (T - 1), "sink": 1.0}),
], ids=["previous-token", "induction", "duplicate", "first-token"])  # fmt: skip
def test_pure_patterns_score_one_in_their_role(pattern, expected):
    """A pure pattern scores 1 in its own role, and elsewhere only where its entries coincide with another role's:
    query 1's key one back is the first key (1 of the T - 1 text queries), and query n's previous occurrence is
    key 0 (1 of the n second-half queries)."""
    got = scores_of(pattern)
    assert got == pytest.approx(expected, abs=1e-12)


def test_uniform_attention_scores_its_closed_form():
    got = scores_of(uniform_pattern(T))
    closed = roles.uniform_scores(HALF, T)
    assert got == pytest.approx(closed, rel=1e-12)
    # the closed forms by hand for n = 6: sum_{q=6..11} 1/(q+1) / 6 and sum_{q=1..11} 1/(q+1) / 11
    assert closed["induction"] == pytest.approx(sum(1 / (q + 1) for q in range(6, 12)) / 6, rel=1e-12)
    assert closed["previous_token"] == pytest.approx(sum(1 / (q + 1) for q in range(1, 12)) / 11, rel=1e-12)
    assert closed["induction"] == pytest.approx(math.log(2) / HALF, rel=0.1)  # about ln 2 / n


def test_scores_keep_leading_dimensions_and_can_fail():
    batch = torch.stack([torch.stack([PREVIOUS, INDUCTION, uniform_pattern(T)])] * 2)  # (B=2, H=3, T, T)
    assert roles.induction_score(batch, HALF).shape == (2, 3)
    np.testing.assert_allclose(roles.previous_token_score(batch)[0], [1.0, 0.0, roles.uniform_scores(HALF, T)["sink"]])
    shifted = one_hot_pattern([q for q in range(HALF)] + [q - HALF + 2 for q in range(HALF, T)])  # one key too late
    assert roles.induction_score(shifted, HALF).item() == 0.0
    with pytest.raises(ValueError, match="repeated once"):
        roles.induction_score(uniform_pattern(T + 1), HALF)


def test_sink_rate_counts_heads_above_the_threshold():
    sink = np.array([[0.9, 0.31, 0.3], [0.05, 0.0, 0.6]])
    assert roles.sink_rate(sink) == pytest.approx(3 / 6)  # 0.3 itself is not above
    assert roles.sink_rate(sink, threshold=0.5) == pytest.approx(2 / 6)


# -------------------------------------------------------------------------------------------- the inputs


def test_repeated_random_tokens_repeat_once_with_distinct_tokens_per_half():
    seqs = roles.repeated_random_tokens(50, 20, 97, seed=3)
    assert seqs.shape == (50, 40) and seqs.dtype == torch.int64
    assert torch.equal(seqs[:, :20], seqs[:, 20:])
    assert all(len(set(row[:20].tolist())) == 20 for row in seqs)
    assert int(seqs.min()) >= 0 and int(seqs.max()) < 97
    assert torch.equal(seqs, roles.repeated_random_tokens(50, 20, 97, seed=3))  # seeded
    assert not torch.equal(seqs, roles.repeated_random_tokens(50, 20, 97, seed=4))
    assert len(set(seqs[:, 0].tolist())) > 20  # the first token varies across sequences
    with pytest.raises(ValueError, match="different token ids"):
        roles.repeated_random_tokens(2, 20, 19, seed=0)


def test_bands_and_copy_losses_pick_the_positions_they_name():
    band = roles.band_positions(100, (0.05, 0.15))  # context lengths 5 .. 14 -> positions 4 .. 13
    assert (band.start, band.stop) == (4, 14)
    late = roles.band_positions(100, (0.85, 0.95))
    assert (late.start, late.stop) == (84, 94)
    tiny = roles.band_positions(4, (0.85, 0.95))  # 3 positions (targets 1..3): at least one, within them
    assert 0 <= tiny.start < tiny.stop <= 3
    losses = tuple(float(p) for p in range(2 * HALF - 1))  # position p has loss p
    first, second = roles.copy_losses(losses, HALF)
    assert first == pytest.approx(np.mean(range(HALF - 1)))  # targets x[1..n-1]
    assert second == pytest.approx(np.mean(range(HALF, 2 * HALF - 1)))  # targets x[n+1..2n-1]


def test_ablation_heads_are_the_top_ones_and_the_weakest_others_of_their_layers():
    induction = np.array([[0.05, 0.60, 0.02, 0.30],
                          [0.50, 0.01, 0.40, 0.03]])  # fmt: skip
    top, control = roles.ablation_heads(induction, 2)
    assert top == [(0, 1), (1, 0)]
    assert control == [(0, 2), (1, 1)]
    top, control = roles.ablation_heads(induction, 3)
    assert top == [(0, 1), (1, 0), (1, 2)] and control == [(0, 2), (1, 1), (1, 3)]
    top, control = roles.ablation_heads(np.array([[0.5, 0.4]]), 2)  # no other head left in the layer
    assert top == [(0, 0), (0, 1)] and control == []


# --------------------------------------------------------------------------------------------- on models


def zero_attention_model(path, vocab: int, **overrides):
    """A saved tiny model whose Q and K are zero: every score is 0, so attention is exactly uniform."""
    model = write_model(path, vocab, **overrides)
    for layer in model.attention_layers:
        D = layer.d_model
        with torch.no_grad():
            layer.qkv.weight[: 2 * D] = 0.0
            layer.qkv.bias[: 2 * D] = 0.0
    from attnlab.model.checkpoint import save_model

    save_model(path, model)
    return model


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("head_roles")
    write_tokens(root / "tokens", vocab_size=512)
    overrides = {"tokenizer": {"vocab_size": 512}, "train": {"device": "cpu"},
                 "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 24},
                 "attention": {"n_examples": 5, "seq_len_filter": [4, 8]}, "head_roles": {"n_sequences": 7, "top_k": 2, "batch_size": 3}}
    write_params(root / "params.yaml", overrides)
    return root


def test_uniform_attention_through_the_stage_gives_the_closed_forms(project, tmp_path):
    zero_attention_model(tmp_path / "model.pt", 512, seq_len=24)
    params = load_params(project / "params.yaml")
    result = roles.head_roles(params, tmp_path / "model.pt", project / "tokens", tmp_path / "head_roles.parquet")
    closed = roles.uniform_scores(12, 24)
    table = result["table"]
    for role in roles.ROLES:
        np.testing.assert_allclose(table.loc[table["role"] == role, "score"], closed[role], rtol=1e-6)
    assert result["metrics"]["uniform"] == pytest.approx(closed)


def test_the_stage_writes_its_table_and_metrics(project):
    model = write_model(project / "model.pt", 512, seq_len=24)
    result = run_stage("head_roles.py", "--params", "params.yaml", "--model", "model.pt", "--tokens", "tokens",
                       "--out", "attention/head_roles.parquet", "--metrics", "reports/head_roles.json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("head_roles: strongest induction head L")
    table = pd.read_parquet(project / "attention" / "head_roles.parquet")
    metrics = json.loads((project / "reports" / "head_roles.json").read_text())
    assert len(table) == 2 * 4 * len(roles.ROLES)
    assert set(table.columns) == {"layer", "head", "role", "score", "measured_on", "n_sequences", "seq_len"}
    for row in table.itertuples():
        assert metrics["heads"][f"L{row.layer}H{row.head}"][row.role] == pytest.approx(row.score, rel=1e-12)
        assert row.measured_on == roles.MEASURED_ON[row.role]
        assert (row.n_sequences, row.seq_len) == ((7, 24) if row.measured_on == roles.REPEATED else (5, 24))
    assert ((table["score"] >= 0) & (table["score"] <= 1)).all()
    best = table[table["role"] == "induction"].sort_values("score").iloc[-1]
    assert metrics["strongest"]["induction"] == {"head": f"L{best['layer']}H{best['head']}", "score": best["score"]}
    icl = metrics["icl"]
    assert icl["repeat_icl_nats"] == pytest.approx(icl["repeat_second_copy_loss"] - icl["repeat_first_copy_loss"])
    assert icl["icl_score_nats"] == pytest.approx(icl["val_late_loss"] - icl["val_early_loss"])
    ablation = metrics["ablation"]
    assert len(ablation["heads"]) == 2 and ablation["heads"][0] == metrics["strongest"]["induction"]["head"]
    assert not set(ablation["heads"]) & set(ablation["control_heads"])
    # the baseline of the causal check is the model's own loss on the repeated sequences, scored without edits
    repeats = roles.repeated_random_tokens(7, 12, 512, seed=0)
    plain = score_batches(model, roles.sequence_batches(repeats, 3, "cpu"))
    first, second = roles.copy_losses(plain.position_loss, 12)
    assert ablation["loss_first_copy"]["baseline"] == pytest.approx(first, rel=1e-6)
    assert ablation["loss_second_copy"]["baseline"] == pytest.approx(second, rel=1e-6)
    assert ablation["rise_second_copy"]["induction_heads"] != 0.0  # the ablation changed something


def test_induction_scores_of_the_stage_are_the_captured_patterns(tmp_path):
    """pattern_scores against the attention captured in one forward pass, read at the induction entries by a loop."""
    write_model(tmp_path / "model.pt", 512, seq_len=24)
    model, _ = load_model(tmp_path / "model.pt")
    repeats = roles.repeated_random_tokens(4, 12, 512, seed=1)
    got = roles.pattern_scores(model, repeats, 3, {"induction": lambda p: roles.induction_score(p, 12)})
    with torch.no_grad(), capture_attention(model) as cache:
        model(repeats)
    for layer in range(2):
        pattern = cache[layer].double()  # (B, H, T, T)
        expected = [np.mean([pattern[b, h, 12 + j, j + 1].item() for b in range(4) for j in range(12)])
                    for h in range(4)]
        np.testing.assert_allclose(got["induction"][layer], expected, rtol=1e-9)


def test_top_k_must_leave_a_control_head(project, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(project / "params.yaml", overrides={"head_roles": {"top_k": 8}})
    assert err.value.key == "head_roles.top_k" and "n_layers x model.n_heads = 8" in str(err.value)
    write_model(tmp_path / "small.pt", 512, seq_len=24, n_layers=1, n_heads=2)  # smaller than params.yaml says
    with pytest.raises(ConfigError) as err:
        roles.head_roles(load_params(project / "params.yaml"), tmp_path / "small.pt", project / "tokens",
                         tmp_path / "out.parquet")
    assert err.value.key == "head_roles.top_k" and not (tmp_path / "out.parquet").exists()


def test_a_model_trained_to_copy_has_induction_heads_and_the_causal_check_finds_them():
    """A 2-layer model trained on repeated random tokens learns to copy: its second copy's loss falls to near 0,
    a layer-1 head scores near 1 as induction, and mean-ablating it raises the second copy's loss by nats while
    the first copy's (random, unpredictable either way) barely moves. An untrained model shows none of it."""
    from attnlab.model.transformer import lm_loss
    from builders import tiny_model

    vocab, half = 32, 8
    model = tiny_model(vocab, seq_len=2 * half, d_model=32, n_heads=2, n_layers=2, d_ff=64)
    repeats = roles.repeated_random_tokens(16, half, vocab, seed=0)
    untrained = roles.role_scores(model, repeats, repeats, 8)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = roles.repeated_random_tokens(16, half, vocab, seed=1000 + step)
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    trained = roles.role_scores(model, repeats, repeats, 8)
    first, second = trained.repeat_losses
    assert second < 1.0 < math.log(vocab) - 0.5 < first  # it copies; the first copy stays at chance
    assert trained.heads["induction"][1].max() > 0.8 > 0.2 > untrained.heads["induction"].max()
    ablation = roles.ablation_check(model, repeats, trained.heads["induction"], 1, 8)
    assert ablation["heads"][0].startswith("L1")
    assert ablation["rise_second_copy"]["induction_heads"] > 1.0 > abs(ablation["rise_first_copy"]["induction_heads"])
    assert ablation["second_copy_rises_more_than_first"]
