"""attention_dynamics stage: per-head attention statistics of every training snapshot (models/snapshots) on the
validation examples of attention_stats -> data/attention/dynamics.parquet, reports/attention_dynamics.json."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.analysis.dynamics import attention_dynamics
from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json, write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--snapshots", required=True, help="models/snapshots (written by the train stage)")
    parser.add_argument("--tokens", required=True, help="data/tokens")
    parser.add_argument("--reference", help="reports/attention.json: the last snapshot is checked against it")
    parser.add_argument("--out", required=True, help="data/attention/dynamics.parquet")
    parser.add_argument("--metrics", required=True, help="reports/attention_dynamics.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    start = time.perf_counter()
    reference = None
    if args.reference:
        try:
            reference = read_json(args.reference)
        except (OSError, ValueError) as exc:
            raise ConfigError(args.reference, f"unreadable ({exc.__class__.__name__}): rerun attention_stats") from exc
    result = attention_dynamics(params, args.snapshots, args.tokens, args.out, reference, progress=True)
    metrics = result["metrics"]
    write_json(args.metrics, metrics)
    table, last = result["table"], metrics["last"]
    first = table[table["step"] == metrics["first_step"]]["mean_normalized_support"].mean()
    check = metrics.get("last_vs_attention_stats")
    versus = "" if check is None else (
        f"; last vs attention_stats: {check.get('max_abs_diff_entropy_bits', float('nan')):.4f} bits, "
        f"{check.get('max_abs_diff_normalized_support', float('nan')):.4f} normalized support"
    )
    print(
        f"attention_dynamics: {metrics['n_snapshots']} snapshots ({metrics['first_train_tokens']:,} to "
        f"{metrics['last_train_tokens']:,} tokens) x {table['layer'].nunique()} layers x {table['head'].nunique()} "
        f"heads on {result['n_examples']} val examples; mean normalized support {first:.3f} -> "
        f"{last['mean_normalized_support']:.3f}{versus}, {time.perf_counter() - start:.1f} s"
    )
    if check is not None and not check["within_tolerance"]:
        print(f"warning: the last snapshot differs from {args.reference} by more than float16 weights explain; "
              "are both from the same training run?", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
