"""What the loop tells the user while it runs: the step and validation logs (TSV for `dvc plots`), the
warning when a run is not learning, and the warning when it will take hours."""

from __future__ import annotations

from pathlib import Path

from attnlab.core.io import atomic_path

LOG_COLUMNS = ("step", "tokens", "loss", "lr")
VAL_COLUMNS = ("step", "tokens", "val_loss")


class LearningWatch:
    """Warns once when, past 30% of the budget, the validation loss is still within 0.1 nats of the unigram
    baseline: the model has learned token frequencies and nothing else."""

    FROM_FRAC = 0.3
    MARGIN = 0.1

    def __init__(self, unigram: float, steps: int):
        self.unigram, self.steps, self.warned = unigram, steps, False

    def check(self, done: int, val_loss: float, log) -> bool:
        if self.warned or done < self.FROM_FRAC * self.steps:
            return False
        if val_loss < self.unigram - self.MARGIN:
            return False
        self.warned = True
        log(f"warning: not learning: at step {done:,} of {self.steps:,} the validation loss {val_loss:.3f} is "
            f"within {self.MARGIN} nats of the unigram baseline {self.unigram:.3f}. Likely causes: train.lr too "
            "high or too low, too short a warmup (train.warmup_frac, train.warmup_steps), or a post-norm model "
            "(model.norm: post) that needs more warmup than pre-norm")
        return True


def warn_if_long(log, budget, done: int, sec_per_step: float) -> None:
    eta = sec_per_step * (budget.steps - done)
    if eta > 30 * 60:
        log(f"at the measured {sec_per_step:.2f} s/step this run needs about {eta / 3600:.1f} more hours. "
            "For a quick look on this machine, stop it (Ctrl-C keeps a checkpoint) and run `make quick`.")


def write_log(path: Path, columns, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("\t".join(columns) + "\n")
            for row in rows:
                f.write("\t".join(fmt(v) for v in row) + "\n")


def append_log(path: Path, rows) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write("\t".join(fmt(v) for v in row) + "\n")


def fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
