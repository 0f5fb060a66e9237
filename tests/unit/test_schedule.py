"""The training recipe in-process: the lr schedule, the token budget, the device choice."""

import math

import pytest
import torch
from builders import write_params

from attnlab.core.device import pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.params import TrainConfig, load_params
from attnlab.training.schedule import Budget, lr_at, make_budget


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1)
    budget = Budget(n_params=1, total_tokens=101, steps=101, tokens_per_step=1, warmup_steps=10)  # steps 0..100
    assert lr_at(0, budget, cfg) == pytest.approx(1e-4)
    assert lr_at(9, budget, cfg) == pytest.approx(1e-3)
    assert lr_at(10, budget, cfg) == pytest.approx(1e-3)
    midway = 10 + 45
    assert lr_at(midway, budget, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, budget, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, budget, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_budget_follows_tokens_per_param_unless_max_tokens_is_set(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", {"train": {"tokens_per_param": 20}}))
    budget = make_budget(params, params.tokenizer.vocab_size)
    assert budget.total_tokens == pytest.approx(20 * budget.n_params, rel=0.01)
    assert budget.total_tokens % budget.tokens_per_step == 0
    params = load_params(write_params(tmp_path / "q.yaml", {"train": {"max_tokens": 100_000}}))
    budget = make_budget(params, params.tokenizer.vocab_size)
    assert budget.steps == 100_000 // (32 * 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_explicit_device_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        pick_device("cuda")
    assert err.value.key == "train.device"
    assert pick_device("auto").type in ("cpu", "mps")
