"""attnlab.model.loss: the blocked head + cross-entropy against F.cross_entropy of the materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.params import ModelConfig
from attnlab.model import loss as loss_module
from attnlab.model.loss import NextTokenLoss, head_cross_entropy, head_token_losses
from attnlab.model.transformer import Transformer, lm_loss


def plain_loss_and_grads(residual, weight, targets, autocast: bool):
    """The reference: the logits made whole, then F.cross_entropy in fp32, differentiated by autograd."""
    h, w = residual.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = h @ w.t()  # (N, V)
    loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def blocked_loss_and_grads(residual, weight, targets, autocast: bool):
    h, w = residual.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = head_cross_entropy(h, w, targets)
    (3.0 * loss).backward()  # the incoming gradient scales both
    return loss.detach(), h.grad / 3.0, w.grad / 3.0


def problem(n: int = 100, d: int = 16, vocab: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    residual = torch.randn(n, d, generator=gen)  # (N, D)
    weight = torch.randn(vocab, d, generator=gen) * 0.5  # (V, D)
    targets = torch.randint(0, vocab, (n,), generator=gen)  # (N,)
    return residual, weight, targets


@pytest.mark.parametrize("block_logits", [16 * 64, 23 * 64, 1 << 19], ids=["blocks", "remainder", "one-block"])
def test_blocked_loss_and_gradients_equal_the_plain_cross_entropy(block_logits, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_LOGITS", block_logits)  # 16 or 23 rows a block, or all 100 at once
    monkeypatch.setattr(loss_module, "MIN_BLOCK_ROWS", 1)
    residual, weight, targets = problem()
    want, got = plain_loss_and_grads(residual, weight, targets, False), blocked_loss_and_grads(residual, weight,
                                                                                               targets, False)
    for name, a, b in zip(("loss", "grad residual", "grad weight"), got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_under_bf16_autocast_it_multiplies_in_bf16_as_the_plain_path_does():
    residual, weight, targets = problem(n=64, d=32)
    want, got = plain_loss_and_grads(residual, weight, targets, True), blocked_loss_and_grads(residual, weight,
                                                                                              targets, True)
    fp32 = plain_loss_and_grads(residual, weight, targets, False)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # the same bf16 logits, one fp32 softmax
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)  # bf16 products, summed in another order
    assert not torch.equal(got[0], fp32[0])  # it did run in bf16


def test_next_token_loss_of_the_transformer_is_lm_loss_of_its_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16), 100)
    x = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))  # (B, T)
    y = torch.roll(x, -1, dims=1)
    lm_loss(model(x), y).backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = NextTokenLoss(model)(x, y)
    loss.backward()
    torch.testing.assert_close(loss, lm_loss(model(x), y).detach(), atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_next_token_loss_of_another_model_goes_through_its_logits():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(10, 10)

        def forward(self, idx):
            return self.table(idx)  # (B, T, V)

    model = Bigram()
    x = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(2))
    assert NextTokenLoss(model)(x, x) == lm_loss(model(x), x)


@pytest.mark.parametrize("block_logits", [16 * 64, 23 * 64], ids=["blocks", "remainder"])
def test_per_row_losses_are_the_plain_cross_entropy_per_row(block_logits, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_LOGITS", block_logits)
    monkeypatch.setattr(loss_module, "MIN_BLOCK_ROWS", 1)
    residual, weight, targets = problem()
    got = head_token_losses(residual.view(4, 25, -1), weight, targets.view(4, 25))  # (B, T) in, (B, T) out
    want = F.cross_entropy(residual @ weight.t(), targets, reduction="none").view(4, 25)
    assert got.shape == (4, 25) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    moved = head_token_losses(residual.view(4, 25, -1), weight, torch.roll(targets, 1).view(4, 25))
    assert not torch.allclose(moved, want)  # the targets are read, row by row
