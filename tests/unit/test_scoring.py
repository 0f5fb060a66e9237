"""attnlab.model.scoring and the training recipe's pieces, each against a plain reference:
the one scoring function, the unigram baseline, evaluate's window choice, the schedule's floor, weight decay
by name, the warmup floor and the not-learning warning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.model.scoring import score_windows, unigram_loss, window_targets
from attnlab.core.params import ModelConfig, TrainConfig
from attnlab.data.tokens import eval_starts
from attnlab.model.transformer import Transformer
from attnlab.training.monitor import LearningWatch
from attnlab.training.schedule import Budget, decays, lr_at, make_optimizer, warmup_steps
from benchmarks.reference import ReferenceGPT

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16, norm="pre")


def test_unigram_loss_matches_a_loop_with_add_one_smoothing():
    train = np.array([3, 3, 3, 5, 7, 7], dtype=np.uint16)
    targets = np.array([3, 7, 9, 0])
    V = 10
    total = len(train) + V
    expected = -sum(math.log((list(train).count(t) + 1) / total) for t in targets) / len(targets)
    assert unigram_loss(train, targets, V) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unigram_loss(np.array([11], dtype=np.uint16), targets, V)


def test_score_windows_is_the_mean_token_loss_of_a_per_token_loop():
    torch.manual_seed(0)
    model = Transformer(TINY, 50).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=400).astype(np.uint16)
    starts = eval_starts(len(tokens), TINY.seq_len, 5 * TINY.seq_len)
    score = score_windows(model, tokens, starts, TINY.seq_len, batch_size=2)
    losses = []
    with torch.no_grad():
        for start in starts:
            window = torch.from_numpy(tokens[start : start + TINY.seq_len + 1].astype(np.int64))
            logits = model(window[None, :-1])[0]  # (T, V)
            for t in range(TINY.seq_len):
                log_p = logits[t] - torch.logsumexp(logits[t], dim=0)
                losses.append(-float(log_p[window[t + 1]]))
    assert score.n_tokens == len(losses) == 5 * TINY.seq_len
    assert score.loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    targets = window_targets(tokens, starts, TINY.seq_len)
    assert list(targets[: TINY.seq_len]) == list(tokens[starts[0] + 1 : starts[0] + 1 + TINY.seq_len])


def test_eval_windows_spread_over_the_whole_split():
    n, T = 10_001, 10
    everything = eval_starts(n, T)
    assert list(everything) == [i * T for i in range((n - 1) // T)]
    some = eval_starts(n, T, 100 * T)
    assert len(some) == 100 and len(set(some)) == 100
    assert np.all(np.diff(some) >= T)  # non-overlapping, in order
    assert some[0] == 0 and some[-1] > 0.95 * n  # from the first file to the last, not one corner
    assert set(some) <= set(everything)
    assert np.array_equal(some, eval_starts(n, T, 100 * T))  # deterministic
    assert np.array_equal(eval_starts(n, T, 10 * n), everything)


def test_cosine_reaches_its_floor_at_the_last_executed_step():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1)
    budget = Budget(n_params=1, total_tokens=100, steps=100, tokens_per_step=1, warmup_steps=10)
    assert lr_at(99, budget, cfg) == pytest.approx(1e-4)  # steps run 0 .. 99
    assert lr_at(10, budget, cfg) == pytest.approx(1e-3)


def test_warmup_has_a_floor_in_steps_capped_at_half_the_run():
    cfg = TrainConfig(warmup_frac=0.05, warmup_steps=100)
    assert warmup_steps(cfg, 976) == 100  # 5% would be 48
    assert warmup_steps(cfg, 12_000) == 600
    assert warmup_steps(cfg, 40) == 20
    assert warmup_steps(TrainConfig(warmup_frac=0.0, warmup_steps=0), 1000) == 0


def test_weight_decay_is_chosen_by_name():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=16, qkv_nonlinear_heads=("all",),
                      pe="learned", norm="pre")
    model = Transformer(cfg, 50)
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.q_proj.mlp_in_bias"].dim() == 2  # 2-D, yet a bias: no decay
    assert not decays("blocks.0.attn.q_proj.mlp_in_bias", False)
    assert decays("blocks.0.attn.q_proj.mlp_in_weight", False)
    assert not decays("blocks.0.ln1.weight", False) and not decays("ln_f.weight", False)
    assert not decays("pos_emb.weight", True)
    assert decays("tok_emb.weight", True) and not decays("tok_emb.weight", False)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1, decay_embedding=False), torch.device("cpu"))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    for name, p in names.items():
        expected = name.endswith("weight") and not any(k in name for k in ("ln", "emb"))
        assert (id(p) in decayed) is expected, name


def test_learning_watch_warns_once_after_30_percent_near_the_unigram_loss():
    lines: list[str] = []
    watch = LearningWatch(unigram=6.3, steps=100)
    assert not watch.check(20, 6.29, lines.append)  # too early to tell
    assert not watch.check(40, 5.0, lines.append)  # learning
    assert watch.check(50, 6.25, lines.append)  # within 0.1 nats of unigram, past 30%
    assert not watch.check(60, 6.25, lines.append)  # once
    assert len(lines) == 1 and "unigram" in lines[0] and "train.lr" in lines[0] and "warmup" in lines[0]
    assert LearningWatch(6.3, 100).check(40, 7.5, lines.append)  # worse than unigram is not learning either


def test_reference_gpt_is_causal_and_has_no_biases():
    model = ReferenceGPT(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=16), 40).eval()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 40
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9])
    assert (after[:, 9] - before[:, 9]).abs().max() > 1e-4


def test_the_optimizer_is_the_fused_kernel_on_cpu_and_steps_like_the_plain_loop():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, seq_len=8), 23) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    plain = make_optimizer(models[1], cfg, torch.device("cpu"))
    for group in plain.param_groups:  # the same groups, stepped by the per-parameter Python loop
        group["fused"], group["foreach"] = None, False
    idx = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain)):
            model(idx).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
