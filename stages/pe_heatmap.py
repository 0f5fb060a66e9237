"""Stage pe_heatmap: the sinusoidal positional encoding, position x dimension, for model.seq_len x model.d_model."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.core.cli import run_cli
from attnlab.core.params import load_params
from attnlab.report.plots_pe import pe_heatmap, save_figure


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    params = load_params(args.params)
    save_figure(pe_heatmap(params.model.seq_len, params.model.d_model), args.out)
    print(
        f"pe_heatmap: {params.model.seq_len} positions x {params.model.d_model} dimensions -> {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
