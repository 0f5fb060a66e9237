"""figure stage: one attention figure (by file name) from data/attention -> reports/figures/<name>."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.core.cli import run_cli
from attnlab.core.params import load_params
from attnlab.report.figures import FIGURES, render


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--name", required=True, help=f"one of: {', '.join(FIGURES)}")
    parser.add_argument("--attention", required=True, help="data/attention (the attention_stats outputs)")
    parser.add_argument("--out", required=True, help="the figure file to write")
    parser.add_argument("--model", help="models/model.pt (attn_tokens.html only)")
    parser.add_argument("--tokenizer", help="data/tokenizer/tokenizer.model (attn_tokens.html only)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    start = time.perf_counter()
    render(args.name, params, args.attention, args.out, args.model, args.tokenizer)
    print(f"figure: wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
