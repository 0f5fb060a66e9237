"""The training objective: mean next-token cross-entropy, with the tied head and the loss computed together.

    loss = NextTokenLoss(model)(x, y)  # x, y (B, T) int64; what the train stage differentiates

On the CPU the head and the loss run fused, a block of rows at a time (:func:`head_cross_entropy`): each
block's logits (rows x V) are made, turned into the loss and into their gradient, and multiplied back into the
gradients of the residual and of the head's weight while they are still in cache. The (B, T, V) logits, their
log-softmax and its gradient (three tensors of B * T * V floats: 16 MB each at the quick profile, 512 MB at the
study's shape) are never materialised, and the backward pass only scales the gradients made forward. Elsewhere
(CUDA, MPS) and under torch.compile, which fuses the loss on its own, it is the plain ``F.cross_entropy`` of
the logits.
:func:`head_token_losses` is the same blocked head for scoring (attnlab.model.scoring): a loss per row, no
gradients.

Shapes: N rows (B * T), D d_model, V vocabulary, C rows per block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnlab.model.transformer import Transformer, lm_loss

BLOCK_LOGITS = 1 << 19  # logits per block (2 MB in fp32): rows = BLOCK_LOGITS // V, 256 rows at V = 2048 ...
# ... but never fewer rows than this: each block is a dozen operations, and at V = 8192 blocks of 64 rows made
# ~3,000 a step at the study's shape, which 2 threads on a loaded machine pay for dearly (docs/performance.md)
MIN_BLOCK_ROWS = 256


def head_cross_entropy(residual: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lm_loss(residual @ weight.T, targets): residual (..., D), weight (V, D), targets (...) int64.

    Under autocast the product runs in the autocast dtype and the softmax in fp32, as lm_loss of the model's
    logits would. On the CPU it is computed block by block (see the module docstring); same loss, same
    gradients up to the order of fp32 sums.
    """
    residual, targets = residual.reshape(-1, residual.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    if residual.device.type != "cpu" or torch.compiler.is_compiling():  # compile fuses the plain form itself
        return lm_loss(residual @ weight.t(), targets)
    device = residual.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else residual.dtype
    with torch.autocast(device, enabled=False):
        return _BlockedHeadLoss.apply(residual, weight, targets, dtype)


@torch.no_grad()
def head_token_losses(residual: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's next-token cross-entropy under the tied head, without gradients: residual (..., D), weight
    (V, D), targets (...) -> losses (...) float32, F.cross_entropy(residual @ weight.T, reduction="none") made
    a block of rows at a time (logsumexp - target logit), so that only one block of logits exists at once."""
    flat, y = residual.reshape(-1, residual.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    losses = torch.empty(len(y), dtype=torch.float32, device=residual.device)  # (N,)
    rows = max(MIN_BLOCK_ROWS, BLOCK_LOGITS // weight.shape[0])
    for first in range(0, len(y), rows):
        logits = (flat[first : first + rows] @ weight.t()).float()  # (C, V)
        target = logits.gather(1, y[first : first + rows, None]).squeeze(1)  # (C,)
        torch.sub(torch.logsumexp(logits, dim=-1), target, out=losses[first : first + rows])
    return losses.view(targets.shape)


class _BlockedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients, block by block; backward scales them by the incoming one."""

    @staticmethod
    def forward(ctx, residual, weight, targets, dtype):
        n, V = residual.shape[0], weight.shape[0]
        h, w = residual.to(dtype), weight.to(dtype)  # (N, D), (V, D): what the head's matmul multiplies
        grad_h = torch.empty_like(h)  # (N, D) d(sum of losses)/d residual
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, D)
        losses = torch.empty(n, 1, dtype=torch.float32, device=residual.device)  # (N, 1) each row's loss
        rows = max(MIN_BLOCK_ROWS, BLOCK_LOGITS // V)
        minus_one = torch.full((rows, 1), -1.0, device=residual.device)  # the one-hot, subtracted by scatter
        for first in range(0, n, rows):
            hc, yc = h[first : first + rows], targets[first : first + rows, None]  # (C, D), (C, 1)
            logits = torch.mm(hc, w.t()).float()  # (C, V)
            top = logits.amax(-1, keepdim=True)  # (C, 1)
            target = logits.gather(1, yc)  # (C, 1) the target's logit
            probs = logits.sub_(top).exp_()  # (C, V) exp(logit - max), in place of the logits
            total = probs.sum(-1, keepdim=True)  # (C, 1)
            torch.sub(total.log().add_(top), target, out=losses[first : first + rows])  # logsumexp - target
            probs.div_(total).scatter_add_(1, yc, minus_one[: len(yc)])  # d(loss)/d(logits): softmax - one-hot
            probs = probs.to(dtype)
            torch.mm(probs, w, out=grad_h[first : first + rows])  # (C, D)
            if dtype == torch.float32:
                grad_w.addmm_(probs.t(), hc)  # (V, D)
            else:  # a bf16 product, summed over the blocks in fp32
                grad_w += (probs.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.residual_dtype, ctx.weight_dtype = n, residual.dtype, weight.dtype
        return (losses.sum(dtype=torch.float64) / n).float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n  # the loss is the mean over n rows
        return (grad_h * scale).to(ctx.residual_dtype), (grad_w * scale).to(ctx.weight_dtype), None, None


class NextTokenLoss(nn.Module):
    """The objective as a module, so that DDP and torch.compile wrap the forward pass and the loss together:
    forward(x, y) = mean next-token cross-entropy, x and y (B, T) int64.

    attnlab's Transformer runs its tied head and the loss fused (head_cross_entropy); any other language model
    (the bench's references) goes through its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, Transformer):
            return head_cross_entropy(self.model.residual(x), self.model.tok_emb.weight, y)
        return lm_loss(self.model(x), y)
