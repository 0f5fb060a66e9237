"""train stage: train the transformer on data/tokens; resumes from models/checkpoints when killed.

With train.nproc_per_node > 1 this script re-launches itself under `torchrun --standalone`; for several
nodes, run it under torchrun yourself (see the README, "Scaling up").
"""

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from attnlab.cli import run_cli
from attnlab.config import load_params
from attnlab.device import pick_device
from attnlab.io import save_figure
from attnlab.plots_train import loss_curve
from attnlab.train import TrainPaths, check_world, dist_from_env, train


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--checkpoints", default="models/checkpoints")
    parser.add_argument("--metrics", default="reports/train.json")
    parser.add_argument("--step-log", default="reports/train_log.tsv")
    parser.add_argument("--val-log", default="reports/val_log.tsv")
    parser.add_argument("--figure", default="reports/figures/loss_curve.png")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    nproc = params.train.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        check_world(params.train, pick_device(params.train.device), nproc, nproc)  # fail before launching
        torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` command, this interpreter
        os.execv(sys.executable, [*torchrun, "--standalone", f"--nproc_per_node={nproc}", __file__, *argv])

    paths = TrainPaths(
        tokens=Path(args.tokens), model=Path(args.model), checkpoints=Path(args.checkpoints),
        log=Path(args.step_log), val_log=Path(args.val_log), metrics=Path(args.metrics),
    )
    train(params, paths)
    if dist_from_env().is_main:
        fig = loss_curve(pd.read_csv(paths.log, sep="\t"), pd.read_csv(paths.val_log, sep="\t"))
        save_figure(fig, args.figure)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
