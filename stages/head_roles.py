"""head_roles stage: what each head of the trained model does (induction, duplicate-token, previous-token, sink),
in-context learning, and the causal check of the induction heads -> data/attention/head_roles.parquet,
reports/head_roles.json."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.analysis.head_roles import head_roles
from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="models/model.pt")
    parser.add_argument("--tokens", required=True, help="data/tokens")
    parser.add_argument("--out", required=True, help="data/attention/head_roles.parquet")
    parser.add_argument("--metrics", required=True, help="reports/head_roles.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    start = time.perf_counter()
    result = head_roles(params, args.model, args.tokens, args.out)
    metrics = result["metrics"]
    write_json(args.metrics, metrics)
    best, icl, ablation = metrics["strongest"]["induction"], metrics["icl"], metrics["ablation"]
    print(
        f"head_roles: strongest induction head {best['head']} ({best['score']:.3f}), sink rate "
        f"{metrics['sink_rate']:.2f}; repeated tokens: second copy {icl['repeat_second_copy_loss']:.3f} against "
        f"first {icl['repeat_first_copy_loss']:.3f} nats; ablating {', '.join(ablation['heads'])} raises the second "
        f"copy's loss by {ablation['rise_second_copy']['induction_heads']:.3f} nats (first copy "
        f"{ablation['rise_first_copy']['induction_heads']:.3f}, control heads "
        f"{ablation['rise_second_copy']['control_heads']:.3f}), {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
