"""The attention bench section's loop reference (the original study's formulation) agrees with the streamed
statistics it is timed against."""

from __future__ import annotations

import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats import row_stats
from benchmarks.bench_attention import build, loop_reference_entropy, random_examples

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=24)


def test_loop_reference_matches_row_stats():
    model = build(TINY, 64, 0, "cpu")
    batch = random_examples(3, 24, 64, 1)
    reference = loop_reference_entropy(model, batch)  # (B, L, H, T)
    with torch.inference_mode(), capture_attention(model) as cache:
        model(batch)
        fast = torch.stack([row_stats(cache[layer])["entropy_bits"] for layer in range(2)], 1)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
