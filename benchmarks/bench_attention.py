"""`make bench`'s attention analysis: attnlab.analysis.stats.stream_attention_stats against a plain forward pass
(SDPA, no capture) and the explicit path's forward on the same batches, its entropies against the original
study's loop over layers, heads and query positions, and the peak memory of the streamed stage path in a fresh
process at two n_examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from attnlab.analysis.capture import capture_attention, explicit_attention
from attnlab.analysis.stats import stats_schema, stream_attention_stats
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import ModelConfig
from attnlab.model.transformer import Transformer
from benchmarks.common import ROOT, peak_rss_mb, side_by_side

REPETITION_SECONDS = 0.4  # about how long the forward runs in each repetition: short ones time the machine's noise


def build(shape: dict, vocab_size: int, seed: int, device: str) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**shape), vocab_size).to(device).eval()


def random_examples(n: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq_len), generator=g)  # (N, T)


def loop_reference_entropy(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    """The original study's formulation: for each layer, head and query position, the entropy of that row.

    Returns (B, L, H, T) entropy in bits.
    """
    B, T = batch.shape
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(B, L, H, T)
    with torch.inference_mode(), capture_attention(model) as cache:
        model(batch)
        for layer in range(L):
            for head in range(H):
                for t in range(T):
                    row = cache[layer][:, head, t, : t + 1].float()  # (B, t+1)
                    logs = torch.where(row > 0, torch.log2(row), torch.zeros_like(row))
                    out[:, layer, head, t] = -(row * logs).sum(-1)
    return out


def attention_section(shape: dict, vocab_size: int, batch_size: int, device: str, seed: int, full: bool = True,
                      n_batches: int = 2, repeats: int = 5, memory_n_examples: tuple[int, int] = (32, 128)) -> dict:
    """The bench keys of the attention analysis at one model shape (ModelConfig fields); without `full`, the
    speeds alone (no loop reference, no memory runs)."""
    model = build(shape, vocab_size, seed, device)
    T = shape["seq_len"]
    examples = random_examples(batch_size * n_batches, T, vocab_size, seed + 1).to(device)
    batches = list(examples.split(batch_size))
    n_tokens = examples.numel()

    kept: list = []

    @torch.inference_mode()
    def forward(i: int) -> None:
        for batch in batches:
            model(batch)

    def explicit(i: int) -> None:
        with explicit_attention(model):
            forward(i)

    def analysis(i: int) -> None:
        kept.clear()
        stream_attention_stats(model, {"val": examples}, batch_size, kept.append)

    forward(0)
    start = time.perf_counter()
    forward(0)
    calls = max(1, round(REPETITION_SECONDS / (time.perf_counter() - start)))  # of each run, per repetition
    tok_s = side_by_side({"forward": forward, "explicit": explicit, "analysis": analysis}, steps=calls,
                         reps=repeats, warmup=1, tokens_per_step=n_tokens, device=torch.device(device))
    speeds = {"tokens": n_tokens, "repeats": repeats, "plain_forward_tok_s": round(tok_s["forward"], 1),
              "analysis_tok_s": round(tok_s["analysis"], 1),
              "analysis_vs_forward": round(tok_s["forward"] / tok_s["analysis"], 3),  # its cost in forward passes
              # the forward alone on the explicit (capturable) path, no capture, against SDPA's
              "sdpa_fwd_tok_s": tok_s["forward"], "explicit_fwd_tok_s": tok_s["explicit"],
              "explicit_vs_sdpa_fwd": tok_s["explicit"] / tok_s["forward"]}
    if not full:
        return speeds
    streamed = np.concatenate([t.column("entropy_bits").to_numpy() for t in kept])  # rows (N, L, H, T) order
    start = time.perf_counter()
    reference = loop_reference_entropy(model, batches[0]).numpy()  # (B, L, H, T)
    loop_s = time.perf_counter() - start
    diff = float(np.abs(streamed[: reference.size] - reference.reshape(-1)).max())

    memory = {n: peak_memory_child(shape, vocab_size, batch_size, n, seed) for n in memory_n_examples}
    (n_small, small), (n_large, large) = sorted(memory.items())
    return {
        **speeds,
        "loop_reference_tok_s": round(batches[0].numel() / loop_s, 1),
        "loop_reference_max_abs_diff_bits": diff,
        "loop_reference_matches": diff < 1e-4,
        f"peak_rss_mb_n{n_small}": small["peak_rss_mb"],
        f"peak_rss_mb_n{n_large}": large["peak_rss_mb"],
        f"analysis_rss_growth_mb_n{n_small}": small["growth_mb"],
        f"analysis_rss_growth_mb_n{n_large}": large["growth_mb"],
        "peak_memory_grows_with_n_examples": large["growth_mb"] > 1.25 * small["growth_mb"] + 16,
    }


def peak_memory_child(shape: dict, vocab_size: int, batch_size: int, n_examples: int, seed: int) -> dict:
    """Run the streamed stage path (stats -> parquet writer) in a fresh process; its peak RSS in MB."""
    spec = json.dumps(dict(shape=shape, vocab_size=vocab_size, batch_size=batch_size, n_examples=n_examples, seed=seed))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}  # the modules this process runs
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention", spec], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_child(spec: dict) -> dict:
    keep_freed_memory()  # as the attention_stats stage runs
    model = build(spec["shape"], spec["vocab_size"], spec["seed"], "cpu")
    T = spec["shape"]["seq_len"]
    examples = {split: random_examples(spec["n_examples"], T, spec["vocab_size"], spec["seed"] + i)
                for i, split in enumerate(("train", "val"))}
    with torch.inference_mode():  # warm up allocator and kernels on one small batch
        model(examples["train"][:1])
    before = peak_rss_mb()
    schema = stats_schema(spec["n_examples"], model.cfg.n_layers, model.cfg.n_heads, T)
    with tempfile.TemporaryDirectory() as tmp, pq.ParquetWriter(Path(tmp) / "s.parquet", schema) as writer:
        stream_attention_stats(model, examples, spec["batch_size"], writer.write_table)
    peak = peak_rss_mb()
    return {"peak_rss_mb": round(peak, 1), "growth_mb": round(peak - before, 1)}


if __name__ == "__main__":  # the memory child: python -m benchmarks.bench_attention '<spec json>'
    print(json.dumps(_memory_child(json.loads(sys.argv[1]))))
