"""train stage: train the transformer on data/tokens; resumes from models/checkpoints when killed. Writes a
float16 weight snapshot to models/snapshots at initialization and every validation point (for the attention_dynamics stage).

With train.nproc_per_node > 1 this script re-launches itself under `torchrun --standalone`; for several
nodes, run it under torchrun yourself (see the README, "Scaling up").
"""

import argparse
import os
import sys
from pathlib import Path


from attnlab.core.cli import run_cli
from attnlab.core.device import pick_device
from attnlab.core.params import load_params
from attnlab.training.distributed import check_world
from attnlab.training.loop import TrainPaths, train


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--checkpoints", default="models/checkpoints")
    parser.add_argument("--metrics", default="reports/train.json")
    parser.add_argument("--step-log", default="reports/train_log.tsv")
    parser.add_argument("--val-log", default="reports/val_log.tsv")
    parser.add_argument("--snapshots", default="models/snapshots", help="float16 weights at init and every validation point")
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
        snapshots=Path(args.snapshots),
    )
    train(params, paths)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
