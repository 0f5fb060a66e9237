"""Stage loss_curve: the training and validation loss against tokens seen (from the train stage's logs), and
the validation loss by position in the window (from evaluate's loss_by_position.json).

A stage of its own, so that train and evaluate import nothing from attnlab.report: a change to a figure never
retrains or re-evaluates the model."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from attnlab.core.cli import run_cli
from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json
from attnlab.report.plots_train import loss_by_position_figure, loss_curve
from attnlab.report.style import save_figure


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-log", default="reports/train_log.tsv")
    parser.add_argument("--val-log", default="reports/val_log.tsv")
    parser.add_argument("--out", default="reports/figures/loss_curve.png")
    parser.add_argument("--by-position", default="reports/loss_by_position.json")
    parser.add_argument("--eval", default="reports/eval.json")
    parser.add_argument("--by-position-out", help="also draw the loss by position (from --by-position, --eval)")
    args = parser.parse_args(argv)
    logs = []
    for path in (args.step_log, args.val_log):
        try:
            logs.append(pd.read_csv(path, sep="\t"))
        except FileNotFoundError:
            raise ConfigError(path, "training log not found: run the train stage first") from None
    if args.by_position_out:  # every input is read before anything is drawn
        curves, metrics = (read_json_input(path, "run the evaluate stage first")
                           for path in (args.by_position, args.eval))
    save_figure(loss_curve(*logs), args.out)
    print(f"loss_curve: {len(logs[0])} steps, {len(logs[1])} validation points -> {args.out}")
    if args.by_position_out:
        save_figure(loss_by_position_figure(curves, metrics), args.by_position_out)
        paired = ", ".join(f"{m} x seq_len {loss:.3f}" for m, loss in
                           zip(curves.get("context_multiples", []), curves.get("paired_loss", [])))
        paired = f"; the same targets at {paired}" if paired else ""
        print(f"loss_curve: loss by position, mean {metrics.get('val_loss', float('nan')):.3f}{paired} "
              f"-> {args.by_position_out}")


def read_json_input(path: str, hint: str) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ConfigError(path, f"not found: {hint}") from None


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
