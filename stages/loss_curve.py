"""Stage loss_curve: the training and validation loss against tokens seen, from the train stage's logs.

A stage of its own, so that the train stage imports nothing from attnlab.report: a change to a figure never
retrains the model."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.report.plots_train import loss_curve
from attnlab.report.style import save_figure


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-log", default="reports/train_log.tsv")
    parser.add_argument("--val-log", default="reports/val_log.tsv")
    parser.add_argument("--out", default="reports/figures/loss_curve.png")
    args = parser.parse_args(argv)
    logs = []
    for path in (args.step_log, args.val_log):
        try:
            logs.append(pd.read_csv(path, sep="\t"))
        except FileNotFoundError:
            raise ConfigError(path, "training log not found: run the train stage first") from None
    save_figure(loss_curve(*logs), args.out)
    print(f"loss_curve: {len(logs[0])} steps, {len(logs[1])} validation points -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
