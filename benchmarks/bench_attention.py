"""Benchmark section for the attention analysis (`make bench`), measured in one run on the same batches:

- plain_forward_tok_s: the model's forward pass with the fused attention kernel (SDPA), no capture;
- analysis_tok_s: attnlab.stats.stream_attention_stats (capture through hook points + every statistic + the
  arrow tables of rows); analysis_vs_forward = plain_forward_tok_s / analysis_tok_s (goal: <= 1.5);
- loop_reference_tok_s: the original study's formulation (capture, then a Python loop over layers, heads and
  query positions), and loop_reference_max_abs_diff_bits: it must give the same entropies;
- peak memory (ru_maxrss of a fresh process running the streamed stage path, parquet writer included) at two
  values of n_examples: it must not grow with n_examples.

    python -m benchmarks.bench_attention --out reports/bench.json   # merges the "attention" key into the file
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.stats import stats_schema, stream_attention_stats
from attnlab.core.io import read_json, write_json
from attnlab.core.params import ModelConfig
from attnlab.model.transformer import Transformer

SECTION = "attention"
CPU_SHAPE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=256)


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


def _best_times(fns: list, repeats: int) -> list[float]:
    """Best-of-`repeats` seconds of each function, runs interleaved so they share the machine's conditions."""
    for fn in fns:
        fn()  # warm-up
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def attention_section(
    shape: dict | None = None,
    vocab_size: int = 8192,
    batch_size: int = 8,
    n_batches: int = 2,
    repeats: int = 3,
    loop_batches: int = 1,
    memory_n_examples: tuple[int, int] = (32, 128),
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """The benchmark rows of the attention analysis on one model shape (default: the CPU shape)."""
    shape = dict(CPU_SHAPE if shape is None else shape)
    model = build(shape, vocab_size, seed, device)
    T = shape["seq_len"]
    examples = random_examples(batch_size * n_batches, T, vocab_size, seed + 1).to(device)
    batches = list(examples.split(batch_size))
    n_tokens = examples.numel()

    def forward():
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    kept: list = []

    def analysis():
        kept.clear()
        stream_attention_stats(model, {"val": examples}, batch_size, kept.append)

    forward_s, analysis_s = _best_times([forward, analysis], repeats)
    streamed = np.concatenate([t.column("entropy_bits").to_numpy() for t in kept])  # rows (N, L, H, T) order

    loop_examples = batches[:loop_batches]
    start = time.perf_counter()
    reference = torch.cat([loop_reference_entropy(model, b) for b in loop_examples]).numpy()  # (B', L, H, T)
    loop_s = time.perf_counter() - start
    loop_tokens = sum(b.numel() for b in loop_examples)
    diff = float(np.abs(streamed[: reference.size] - reference.reshape(-1)).max())

    memory = {n: peak_memory_child(shape, vocab_size, batch_size, n, seed) for n in memory_n_examples}
    (n_small, small), (n_large, large) = sorted(memory.items())
    return {
        "device": device,
        "shape": {**shape, "vocab_size": vocab_size, "batch_size": batch_size},
        "threads": torch.get_num_threads(),
        "tokens": n_tokens,
        "repeats": repeats,
        "plain_forward_tok_s": round(n_tokens / forward_s, 1),
        "analysis_tok_s": round(n_tokens / analysis_s, 1),
        "analysis_vs_forward": round(analysis_s / forward_s, 3),  # cost of the analysis in forward passes
        "loop_reference_tok_s": round(loop_tokens / loop_s, 1),
        "loop_reference_max_abs_diff_bits": diff,
        "loop_reference_matches": diff < 1e-4,
        f"peak_rss_mb_n{n_small}": small["peak_rss_mb"],
        f"peak_rss_mb_n{n_large}": large["peak_rss_mb"],
        f"analysis_rss_growth_mb_n{n_small}": small["growth_mb"],
        f"analysis_rss_growth_mb_n{n_large}": large["growth_mb"],
        "peak_memory_grows_with_n_examples": large["growth_mb"] > 1.25 * small["growth_mb"] + 16,
    }


# ------------------------------------------------------------------------------------ memory (child process)


def _rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def peak_memory_child(shape: dict, vocab_size: int, batch_size: int, n_examples: int, seed: int) -> dict:
    """Run the streamed stage path (stats -> parquet writer) in a fresh process; its peak RSS in MB."""
    spec = json.dumps(dict(shape=shape, vocab_size=vocab_size, batch_size=batch_size, n_examples=n_examples, seed=seed))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_attention", "--memory-child", spec],
        cwd=Path(__file__).resolve().parents[1],  # the repository root, where `benchmarks` is a package
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_child(spec: dict) -> dict:
    model = build(spec["shape"], spec["vocab_size"], spec["seed"], "cpu")
    T = spec["shape"]["seq_len"]
    examples = {
        split: random_examples(spec["n_examples"], T, spec["vocab_size"], spec["seed"] + i)
        for i, split in enumerate(("train", "val"))
    }
    with torch.inference_mode():  # warm up allocator and kernels on one small batch
        model(examples["train"][:1])
    before = _rss_mb()
    schema = stats_schema(spec["n_examples"], model.cfg.n_layers, model.cfg.n_heads, T)
    with tempfile.TemporaryDirectory() as tmp, pq.ParquetWriter(Path(tmp) / "s.parquet", schema) as writer:
        stream_attention_stats(model, examples, spec["batch_size"], writer.write_table)
    peak = _rss_mb()
    return {"peak_rss_mb": round(peak, 1), "growth_mb": round(peak - before, 1)}


# ------------------------------------------------------------------------------------------------- main


def merge_into(path: str | Path, section: dict) -> dict:
    path = Path(path)
    bench = read_json(path) if path.exists() else {}
    bench[SECTION] = section
    write_json(path, bench)
    return bench


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return
    section = attention_section(n_batches=args.n_batches, repeats=args.repeats, device=args.device)
    merge_into(args.out, section)
    width = max(map(len, section))
    for key, value in section.items():
        print(f"{key:<{width}}  {value}")
    goal = "met" if section["analysis_vs_forward"] <= 1.5 else "NOT met"
    print(f"attention bench: analysis costs {section['analysis_vs_forward']:.2f}x a plain forward (goal <= 1.5x: "
          f"{goal}); wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
