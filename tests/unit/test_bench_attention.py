"""The attention bench section runs on a tiny shape and its loop reference agrees with the streamed stats."""

from __future__ import annotations

import json

import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats import row_stats
from benchmarks.bench_attention import attention_section, build, loop_reference_entropy, merge_into, random_examples

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=24)


def test_loop_reference_matches_row_stats():
    model = build(TINY, 64, 0, "cpu")
    batch = random_examples(3, 24, 64, 1)
    reference = loop_reference_entropy(model, batch)  # (B, L, H, T)
    with torch.inference_mode(), capture_attention(model) as cache:
        model(batch)
        fast = torch.stack([row_stats(cache[layer])["entropy_bits"] for layer in range(2)], 1)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_section_rows_and_merge(tmp_path):
    section = attention_section(TINY, vocab_size=64, batch_size=2, n_batches=2, repeats=1, memory_n_examples=(2, 6))
    for key in ("plain_forward_tok_s", "analysis_tok_s", "loop_reference_tok_s"):
        assert section[key] > 0
    assert section["loop_reference_matches"] is True
    assert section["analysis_vs_forward"] > 0
    assert "peak_rss_mb_n2" in section and "peak_rss_mb_n6" in section
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"train": {"tok_s": 1.0}}))
    merged = merge_into(out, section)
    assert merged["train"] == {"tok_s": 1.0} and json.loads(out.read_text())["attention"] == json.loads(json.dumps(section))
