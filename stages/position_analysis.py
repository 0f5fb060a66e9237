"""Stage position_analysis: where the trained model keeps position (variance split per dimension, linear probe)."""

from __future__ import annotations

import argparse
import sys
import time

from attnlab.analysis.probes import analyse_checkpoint
from attnlab.core.cli import run_cli
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import load_params
from attnlab.report.plots_pe import plot_dimension_variance, plot_position_probe, save_figure


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True, help="models/model.pt")
    parser.add_argument("--tokens", required=True, help="folder with val.bin")
    parser.add_argument("--variance-figure", required=True, help="pe_dimension_variance.png")
    parser.add_argument("--probe-figure", required=True, help="position_probe.png")
    parser.add_argument("--metrics", required=True, help="JSON with the probe's held-out R^2 per point")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    params = load_params(args.params)
    keep_freed_memory()  # large tensors every batch: reuse their pages (attnlab.core.memory)
    variance, probe = analyse_checkpoint(
        args.model, args.tokens, params.probe.n_examples, params.probe.ridge, params.analysis.seed, params.train.device
    )
    save_figure(plot_dimension_variance(variance), args.variance_figure)
    save_figure(plot_position_probe(probe), args.probe_figure)
    write_json(args.metrics, {"position_probe_r2": dict(zip(probe["point"], probe["r2"].round(6)))})
    summary = ", ".join(f"{p} {r2:.3f}" for p, r2 in zip(probe["point"], probe["r2"]))
    print(
        f"position_analysis: {params.probe.n_examples} windows, {len(probe)} points, held-out R^2 {summary} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
