"""attention_stats stage: per-row attention statistics of the trained model -> data/attention, reports/attention.json."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.analysis.stats import attention_stats
from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="models/model.pt")
    parser.add_argument("--tokens", required=True, help="data/tokens")
    parser.add_argument("--out", required=True, help="folder for stats.parquet, mean_patterns.npy, examples.npz")
    parser.add_argument("--metrics", required=True, help="reports/attention.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    start = time.perf_counter()
    result = attention_stats(params, args.model, args.tokens, args.out)
    write_json(args.metrics, {**result["metrics"], "seconds": round(time.perf_counter() - start, 2)})  # wall time
    val = result["metrics"]["val"]
    print(
        f"attention_stats: {result['n_rows']:,} rows ({params.attention.n_examples} examples x 2 splits x "
        f"{result['n_layers']} layers x {result['n_heads']} heads x {result['seq_len']} positions), "
        f"val mean support {val['mean_support']:.2f} tokens, {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
