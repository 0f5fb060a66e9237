"""What every benchmark needs: the quick profile (read from the Makefile), `--set` overrides, token folders, the
train stage's own set-up, step and loop in a temporary folder, timing side by side and window by window, and
FLOP/s peaks. The benchmarks time attnlab's own code (attnlab.training.loop), never a copy of it."""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnlab.core.errors import ConfigError
from attnlab.core.params import ModelConfig, Params
from attnlab.model.checkpoint import load_model
from attnlab.model.loss import NextTokenLoss
from attnlab.report.compare.grid import parse_override
from attnlab.training import loop
from attnlab.training.schedule import make_optimizer
from benchmarks.reference import ReferenceTrainer

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak in FLOP/s (no sparsity), matched against torch.cuda.get_device_name().
CUDA_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
PARTNER_WARMUP = 2  # untimed steps of each partner before LoopTimer's first window
Step = Callable[[int], object]  # runs training step i


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type


# ------------------------------------------------------------------------------------------------ params


def parse_overrides(items: list[str]) -> dict:
    """["model.d_model=128", "seed=2"] -> {"model": {"d_model": 128}, "seed": 2}: each item one value in DVC's -S
    grammar (attnlab.report.compare.grid)."""
    nested: dict = {}
    for item in items:
        try:
            override = parse_override(item)
        except ConfigError as exc:
            raise ConfigError("--set", exc.message) from None
        if override.delete or len(override.values) != 1:
            raise ConfigError("--set", f"{item!r}: expected KEY=VALUE, one value (a sweep is `make sweep`'s)")
        *parents, leaf = override.key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = override.values[0]
    return nested


# ------------------------------------------------------------------------------ the train stage, as it runs


def synthetic_tokens(folder: Path, vocab_size: int, n_tokens: int, seq_len: int, seed: int) -> Path:
    """A token folder of random 32-token phrases in random order (learnable by attending back), for when there
    are no real token files; the val split holds 4 windows."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(2, vocab_size, size=(256, 32))  # (n_phrases, phrase_len)
    stream = phrases[rng.integers(0, 256, size=n_tokens // 32 + 1)].reshape(-1)[:n_tokens].astype(np.uint16)
    split = n_tokens - 4 * (seq_len + 1)
    folder.mkdir(parents=True, exist_ok=True)
    stream[:split].tofile(folder / "train.bin")
    stream[split:].tofile(folder / "val.bin")
    meta = {"vocab_size": vocab_size, "eos_id": 1, "train": {"tokens": split}, "val": {"tokens": n_tokens - split}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def stage_step(params: Params, tokens: str | Path, folder: Path, model: torch.nn.Module | None = None,
               compile: bool = False) -> Step:
    """Step i of the train stage (loop.train_step: batch i, schedule, autocast, clipping, AdamW) after its own
    set-up (loop.set_up, outputs in `folder`); on `model` instead, with the stage's optimizer, if given; through
    torch.compile as the stage compiles on CUDA, if asked."""
    run = loop.set_up(params, loop.TrainPaths.under(folder, tokens))
    if model is not None:
        model = model.to(run.device)
        optimizer = make_optimizer(model, params.train, run.device)
        run = dataclasses.replace(run, model=model, train_model=NextTokenLoss(model), optimizer=optimizer)
    if compile:
        run.train_model = torch.compile(run.train_model)
    return lambda i: loop.train_step(run, i)


def train_stage(params: Params, tokens: str | Path,
                on_log: Callable[[loop.LogEvent], None] | None = None) -> tuple[dict, torch.nn.Module]:
    """The train stage's own function in a temporary folder: (train.json's metrics, the trained model on CPU)."""
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-") as tmp:
        paths = loop.TrainPaths.under(Path(tmp), tokens)
        metrics = loop.train(params, paths, on_log)
        model, _ = load_model(paths.model, "cpu")
    return metrics, model


# ------------------------------------------------------------------------------------------------ timing


def side_by_side(runs: dict[str, Step], steps: int, reps: int, warmup: int, tokens_per_step: int,
                 device: torch.device) -> dict[str, float]:
    """Median tokens/s of each run over `reps` repetitions of `steps` steps, the runs alternating (order
    reversed every other repetition) so that all of them see the same machine load."""
    for run in runs.values():
        for i in range(warmup):
            run(i)
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name in list(runs) if rep % 2 == 0 else reversed(list(runs)):
            start = time.perf_counter()
            for i in range(steps):
                runs[name](warmup + rep * steps + i)
            sync(device)
            samples[name].append(steps * tokens_per_step / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


class LoopTimer:
    """Times the train stage's loop window by window, as train(on_log=timer), with partner steps interleaved.

    A window runs from one log event to the next, if it starts at `after_step` or later (not in set-up,
    compilation, warm-up); the loop's seconds in it are the events' train_seconds apart less this timer's own
    time. After each window each partner runs as many steps, timed, the partners' order reversed every other
    window, so that a drift of the machine's speed hits all alike. `spans`: (name, start, end) of every timed
    span, loop windows included; they never overlap."""

    def __init__(self, partners: dict[str, Step] | None = None, device: torch.device = torch.device("cpu"),
                 after_step: int = 0):
        self.partners, self.device, self.after_step = partners or {}, device, after_step
        self.windows: list[dict] = []  # {"steps", "tokens", "loop": seconds, <partner>: seconds}
        self.spans: list[tuple[str, float, float]] = []
        self.events: list[loop.LogEvent] = []
        self._left, self._away, self._partner_step = 0.0, 0.0, 0

    def __call__(self, event: loop.LogEvent) -> None:
        entered = time.perf_counter()
        last = self.events[-1] if self.events else None
        self.events.append(event)
        if last is None:
            for step in self.partners.values():
                for i in range(PARTNER_WARMUP):
                    step(i)
            self._partner_step = PARTNER_WARMUP
        elif last.step >= self.after_step:
            n = event.step - last.step
            window = {"steps": n, "tokens": event.tokens - last.tokens,
                      "loop": event.train_seconds - last.train_seconds - self._away}
            self.spans.append(("loop", self._left, entered))
            names = list(self.partners) if len(self.windows) % 2 == 0 else list(reversed(self.partners))
            for name in names:
                start = time.perf_counter()
                for i in range(n):
                    self.partners[name](self._partner_step + i)
                sync(self.device)
                self.spans.append((name, start, time.perf_counter()))
                window[name] = self.spans[-1][2] - start
            self._partner_step += n
            self.windows.append(window)
        self._left = time.perf_counter()
        self._away = self._left - entered

    def tok_s(self) -> dict[str, float]:
        """Tokens/s of the loop and of each partner over the counted windows."""
        if not self.windows:
            raise RuntimeError(f"bench: no log flush after step {self.after_step} closed a window to time; "
                               "run more steps or log more often (train.log_every)")
        tokens = sum(w["tokens"] for w in self.windows)
        return {name: tokens / sum(w[name] for w in self.windows) for name in ("loop", *self.partners)}


def reference_steps(cfg: ModelConfig, vocab_size: int, train_tokens: np.ndarray, steps: int, batch_size: int,
                    seed: int, device: torch.device, bf16: bool) -> dict[str, Step]:
    """The reference GPT's training loop as LoopTimer partners: in fp32, and under bf16 autocast where asked
    (native bf16), so that the loop is held against the reference at its best precision on this machine."""
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    return {f"reference_{precision}": ReferenceTrainer(cfg, vocab_size, train_tokens, steps, batch_size, seed,
                                                       device, precision).step for precision in precisions}


def loop_speed_keys(speeds: dict[str, float], precision: str, suffix: str = "") -> dict:
    """The bench keys of one LoopTimer run with partners bare_step and reference_<precision>: the loop, its bare
    step and the reference at its faster precision, tokens/s and the two ratios; `precision` is the loop's."""
    references = {name.removeprefix("reference_"): tok_s for name, tok_s in speeds.items()
                  if name.startswith("reference_")}
    best = max(references, key=references.get)
    loop, bare = speeds["loop"], speeds["bare_step"]
    return {
        f"train_loop_tok_s{suffix}": round(loop, 1),  # the stage's loop, validation left out, timed windows
        f"bare_step_tok_s{suffix}": round(bare, 1),
        f"reference_loop_tok_s{suffix}": round(references[best], 1),  # at its faster precision
        **{f"reference_loop_tok_s_{name}{suffix}": round(tok_s, 1) for name, tok_s in references.items()},
        f"train_loop_precision{suffix}": precision,
        f"reference_precision{suffix}": best,
        f"train_loop_vs_step{suffix}": round(loop / bare, 4),
        f"stage_vs_reference_speed{suffix}": round(loop / references[best], 4),
    }


# ------------------------------------------------------------------------------------------------- FLOP/s


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of an n x n x n torch.mm in `dtype`: the best of 5 rounds of about seconds/5 each."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    first = side_by_side({"mm": lambda i: torch.mm(a, b)}, 1, 1, 0, 1, device)["mm"]  # calls/s, warm-up in
    iters = max(1, int(seconds / 5 * first))
    return 2 * n**3 * max(side_by_side({"mm": lambda i: torch.mm(a, b)}, iters, 1, 0, 1, device)["mm"]
                          for _ in range(5))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB: Linux's VmHWM, the peak of this program's own memory.
    (ru_maxrss, the fallback elsewhere, starts a child at its parent's resident size when it forks, so a child
    of a large bench process reported the parent's peak, not its own.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def table_bf16_peak(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA GPU (CUDA_BF16_PEAK), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in CUDA_BF16_PEAK.items() if key in name), None)
