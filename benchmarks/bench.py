"""`make bench`: attnlab's step, loop and attention analysis against references, side by side in one run, at two
shapes: the shape of --params with the --set overrides (`make bench`: the quick profile) and the study's
(STUDY_SHAPE, 4 x 4 x 512 at d_model 128). Two sections run only when --only names them: compile (`make
bench-compile`) and gpu_check (`make gpu-check`). The keys are listed in docs/performance.md.

    python -m benchmarks.bench --out reports/bench.json --set model.d_model=128 ...   # `make bench`
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from attnlab.analysis.stats import attention_stats
from attnlab.core.cli import run_cli
from attnlab.core.device import native_bf16, pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import Params, load_params
from attnlab.data.tokens import load_meta, load_tokens
from attnlab.model.transformer import count_parameters, flops_per_token
from attnlab.training import loop
from attnlab.training.schedule import make_budget
from benchmarks.bench_attention import attention_section
from benchmarks.bench_quality import quality_comparison
from benchmarks.common import (LoopTimer, Step, device_name, loop_speed_keys, matmul_flops, parse_overrides,
                               peak_rss_mb, reference_steps, side_by_side, stage_step, synthetic_tokens,
                               table_bf16_peak, train_stage)
from benchmarks.reference import TorchEncoderLM

SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff", "seq_len")
# The study's shape (one trial of shared/README.md), timed in windows of STUDY_LOG_EVERY of --study-steps steps
STUDY_SHAPE = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, seq_len=512, batch_size=32, vocab_size=8192)
STUDY_LOG_EVERY = 4


@dataclass
class BenchSetup:
    params: Params  # --params with --set, on the bench's device and the token files' vocabulary
    study: Params  # the same recipe at the study's shape (STUDY_SHAPE with --study-shape)
    tokens: Path  # the token files of params (synthetic ones where --tokens has none)
    folder: Path  # temporary: the outputs of each stage set-up
    args: argparse.Namespace
    bf16: bool  # run the bf16 sections (off where bf16 is emulated: hours instead of seconds)

    @property
    def device(self) -> torch.device:
        return torch.device(self.params.train.device)

    @property
    def tokens_per_step(self) -> int:
        return self.params.train.batch_size * self.params.model.seq_len

    def step(self, name: str, precision: str, model: torch.nn.Module | None = None) -> Step:
        """The stage's step at the params' shape (eager, a 1000-step schedule), on `model` if given."""
        train = dataclasses.replace(self.params.train, precision=precision, max_tokens=1000 * self.tokens_per_step,
                                    eval_tokens=self.params.model.seq_len)
        return stage_step(dataclasses.replace(self.params, train=train), self.tokens, self.folder / name, model)

    @functools.cached_property
    def study_tokens(self) -> Path:
        """Synthetic token files of the study's vocabulary, for its sections."""
        p = self.study
        n_tokens = max(1 << 18, 64 * p.train.batch_size * p.model.seq_len)
        return synthetic_tokens(self.folder / "study_tokens", p.tokenizer.vocab_size, n_tokens, p.model.seq_len, p.seed)

    def compare(self, runs: dict[str, Step]) -> dict[str, float]:
        return side_by_side(runs, self.args.steps, self.args.reps, self.args.warmup, self.tokens_per_step, self.device)


Section = Callable[[BenchSetup, dict], dict]


def training_throughput(setup: BenchSetup, precision: str) -> dict:
    """Tokens/s of the stage's step on attnlab's model and on the torch encoder, alternating; keys end in _bf16
    for bf16."""
    if precision == "bf16" and not setup.bf16:
        return {"bf16_skipped": f"no native bf16 on {device_name(setup.device)} (see --bf16)"}
    torch.manual_seed(setup.params.seed)
    encoder = TorchEncoderLM(setup.params.model, setup.params.tokenizer.vocab_size)
    tok_s = setup.compare({"attnlab": setup.step(f"attnlab_{precision}", precision),
                           "torch": setup.step(f"torch_{precision}", precision, model=encoder)})
    suffix = "_bf16" if precision == "bf16" else ""
    return {f"train_tok_s{suffix}": tok_s["attnlab"], f"torch_encoder_tok_s{suffix}": tok_s["torch"],
            f"train_vs_torch_encoder{suffix}": tok_s["attnlab"] / tok_s["torch"]}


def study_loop(setup: BenchSetup, results: dict) -> dict:
    """The stage's train() at the study's shape on synthetic tokens of its vocabulary, at its own precision
    (train.precision auto), against its bare step and the reference GPT's loop (fp32, and bf16 where native),
    timed side by side window by window (LoopTimer); keys end in _study_shape."""
    params, vocab, tokens = setup.study, setup.study.tokenizer.vocab_size, setup.study_tokens
    batch = params.train.batch_size
    partners = {"bare_step": stage_step(params, tokens, setup.folder / "study_bare"),
                **reference_steps(params.model, vocab, load_tokens(tokens, "train"), setup.args.study_steps, batch,
                                  params.seed + 1, setup.device, setup.bf16)}
    timer = LoopTimer(partners, setup.device, after_step=STUDY_LOG_EVERY)  # the first window holds the warm-up
    metrics, _ = train_stage(params, tokens, on_log=timer)
    shape = {**{key: getattr(params.model, key) for key in SHAPE_KEYS}, "batch_size": batch, "vocab_size": vocab}
    return {"study_shape": ", ".join(f"{key} {value}" for key, value in shape.items()),
            **loop_speed_keys(timer.tok_s(), metrics["precision"], "_study_shape")}


def mfu(setup: BenchSetup, results: dict) -> dict:
    n_params = count_parameters(setup.params.model, setup.params.tokenizer.vocab_size)
    per_token = flops_per_token(setup.params.model, n_params)
    size, seconds = setup.args.mm_size, setup.args.mm_seconds
    peak = {"fp32": matmul_flops(setup.device, torch.float32, size, seconds)}
    out = {"n_params": n_params, "flops_per_token": per_token, "matmul_peak_fp32_flop_s": peak["fp32"]}
    if setup.bf16:  # an emulated bf16 matmul of mm_size takes tens of seconds: measured only where native
        measured = matmul_flops(setup.device, torch.bfloat16, size, seconds)
        peak["bf16"] = table_bf16_peak(setup.device) or measured
        out.update({"matmul_peak_bf16_flop_s": measured, "matmul_bf16_vs_fp32": measured / peak["fp32"],
                    "bf16_peak_source": "table" if table_bf16_peak(setup.device) else "measured"})
    for precision, suffix in (("fp32", ""), ("bf16", "_bf16")):
        if f"train_tok_s{suffix}" in results:
            out[f"achieved_flop_s_{precision}"] = results[f"train_tok_s{suffix}"] * per_token
            out[f"mfu_{precision}"] = out[f"achieved_flop_s_{precision}"] / peak[precision]
            reference_flop_s = results[f"torch_encoder_tok_s{suffix}"] * per_token
            out[f"torch_encoder_mfu_{precision}"] = reference_flop_s / peak[precision]
    return out


def attention_analysis(params: Params, device: torch.device, suffix: str = "") -> dict:
    """bench_attention's keys at the shape of `params`, batches of attention.batch_size; the memory runs and the
    loop reference only without a suffix."""
    keys = attention_section({key: getattr(params.model, key) for key in SHAPE_KEYS}, params.tokenizer.vocab_size,
                             params.attention.batch_size, device.type, params.seed, full=not suffix)
    return {f"{key}{suffix}": value for key, value in keys.items()}


def quality(setup: BenchSetup, results: dict) -> dict:
    """The quality section, or a note saying why it is skipped."""
    if not (Path(setup.args.tokens) / "train.bin").exists():
        return {"quality_skipped": f"no token files in {setup.args.tokens} (run `make quick` first)"}
    return quality_comparison(setup.params, setup.tokens, reference_bf16=setup.bf16)


def compile_speed(setup: BenchSetup, results: dict) -> dict:
    """The stage's step eager against its model through torch.compile (as the stage compiles on CUDA), at the
    params' and the study's shape, alternating on the same batches: compile_seconds = the first two compiled
    steps less two eager ones; run_minutes_*: the params' whole budget at those speeds, compile time included."""
    out: dict = {}
    shapes = (("", setup.params, setup.tokens), ("_study_shape", setup.study, setup.study_tokens))
    for suffix, params, tokens in shapes:
        per_step = params.train.batch_size * params.model.seq_len
        runs = {name: stage_step(params, tokens, setup.folder / f"{name}{suffix}", compile=name == "compiled")
                for name in ("eager", "compiled")}
        first = {}
        for name, step in runs.items():  # the first two steps compile (forward, then backward and optimizer)
            start = time.perf_counter()
            for i in range(2):
                step(i)
            first[name] = time.perf_counter() - start
        tok_s = side_by_side(runs, setup.args.steps, setup.args.reps, 1, per_step, setup.device)
        compile_seconds = max(0.0, first["compiled"] - first["eager"])
        out.update({f"compile_seconds{suffix}": round(compile_seconds, 1),
                    f"eager_tok_s{suffix}": round(tok_s["eager"], 1),
                    f"compiled_tok_s{suffix}": round(tok_s["compiled"], 1),
                    f"compiled_vs_eager{suffix}": round(tok_s["compiled"] / tok_s["eager"], 3)})
    run_tokens = make_budget(setup.params, setup.params.tokenizer.vocab_size).total_tokens
    return {**out, "run_tokens": run_tokens, "run_minutes_eager": round(run_tokens / out["eager_tok_s"] / 60, 2),
            "run_minutes_compiled": round((out["compile_seconds"] + run_tokens / out["compiled_tok_s"]) / 60, 2)}


def gpu_check(setup: BenchSetup, results: dict) -> dict:
    """--check-steps steps of the params' model in bf16 with torch.compile (on CUDA) by the train stage's own
    function, one validation and one checkpoint at the end; tokens/s between log flushes after --check-warmup
    steps (LoopTimer: no compilation, start-up or validation), MFU against the dense bf16 peak (else a measured
    bf16 matmul), peak memory, the full study's budget (--params without --set) projected at that speed; then the
    attention analysis of the model it trained. On a CPU (--device cpu) it checks the section, not a machine."""
    a, device, p = setup.args, setup.device, setup.params
    train = dataclasses.replace(p.train, precision="bf16", compile=True, eval_every_frac=1.0, checkpoint_every_frac=1.0,
                                max_tokens=a.check_steps * p.train.batch_size * p.model.seq_len)
    params = dataclasses.replace(p, train=train)
    measured = matmul_flops(device, torch.bfloat16, *((8192, 2.0) if device.type == "cuda" else (256, 0.25)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = LoopTimer(device=device, after_step=a.check_warmup)
    paths = loop.TrainPaths.under(setup.folder / "gpu_check", setup.tokens)
    train_start = time.perf_counter()
    metrics = loop.train(params, paths, on_log=timer)
    train_seconds, tok_s = time.perf_counter() - train_start, timer.tok_s()["loop"]
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    # set-up and compilation: the time before the first timed window beyond what its first steps take at the
    # steady speed (no validation before the end)
    first = next(event for event in timer.events if event.step >= a.check_warmup)
    startup = timer.spans[0][1] - train_start - first.tokens / tok_s
    analysis_start = time.perf_counter()
    analysis = attention_stats(params, paths.model, setup.tokens, setup.folder / "gpu_check_attention")
    peak, flops = table_bf16_peak(device) or measured, flops_per_token(p.model, metrics["n_params"])
    study = load_params(a.params)
    study_tokens = make_budget(study, study.tokenizer.vocab_size).total_tokens
    return {
        "cuda_version": torch.version.cuda, "threads": torch.get_num_threads(),
        **{key: metrics[key] for key in ("n_params", "precision", "steps", "final_train_loss", "final_val_loss")},
        "compiled": device.type == "cuda", "timed_steps": sum(w["steps"] for w in timer.windows),
        "tokens_per_sec": round(tok_s, 1), "tokens_per_sec_train_json": metrics["tokens_per_sec"],
        "startup_and_compile_seconds": round(startup, 2), "peak_memory_mb": round(memory, 1),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
        "flops_per_token": flops, "achieved_flop_s": tok_s * flops, "peak_flop_s": peak, "mfu": tok_s * flops / peak,
        "peak_source": "table (dense bf16)" if table_bf16_peak(device) else "measured bf16 matmul",
        "matmul_peak_bf16_flop_s": measured, "full_study_tokens": study_tokens,
        "projected_full_study_minutes": study_tokens / tok_s / 60, "attention_rows": analysis["n_rows"],
        "train_seconds": round(train_seconds, 2), "analysis_seconds": round(time.perf_counter() - analysis_start, 2),
    }


SECTIONS: list[tuple[str, Section]] = [
    ("train_fp32", lambda setup, results: training_throughput(setup, "fp32")),
    ("study_loop", study_loop),
    ("train_bf16", lambda setup, results: training_throughput(setup, "bf16")),
    ("mfu", mfu),
    ("attention_analysis", lambda setup, results: attention_analysis(setup.params, setup.device)),
    ("attention_analysis_study_shape",
     lambda setup, results: attention_analysis(setup.study, setup.device, "_study_shape")),
    ("quality", quality),
]
OPT_IN: list[tuple[str, Section]] = [("compile", compile_speed), ("gpu_check", gpu_check)]  # run with --only


def run_bench(setup: BenchSetup, sections: list[tuple[str, Section]] = SECTIONS, log=print) -> dict:
    """Runs each section in order and merges their keys: the dict written to bench.json."""
    knobs = {key: getattr(setup.args, key) for key in ("steps", "reps", "mm_size")}
    source = f"{setup.args.tokens}/train.bin" if setup.tokens == Path(setup.args.tokens) else "synthetic"
    results: dict = {
        "device": device_name(setup.device), "torch_version": torch.__version__,
        "config": {**asdict(setup.params.model), "vocab_size": setup.params.tokenizer.vocab_size,
                   "batch_size": setup.params.train.batch_size, **knobs, "token_source": source},
        "section_seconds": {},
    }
    for name, section in sections:
        start = time.perf_counter()
        results.update(section(setup, results))
        results["section_seconds"][name] = round(time.perf_counter() - start, 2)
        log(f"bench: {name} done in {results['section_seconds'][name]:.1f} s")
    return results


def format_table(results: dict) -> str:
    """Every single figure of the results, one a line (the config stays in the JSON)."""
    rows = {key: value for key, value in results.items() if isinstance(value, (int, float, str))}
    width = max(map(len, rows))
    return "\n".join(f"{key:<{width}}  {show(value)}" for key, value in rows.items())


def show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def build_setup(args: argparse.Namespace, folder: Path) -> BenchSetup:
    """The bench's params and token files; every input checked before any run."""
    for key in ("steps", "reps", "mm_size", "mm_seconds", "study_steps", "warmup"):
        value, least = getattr(args, key), 0 if key == "warmup" else 1e-9
        if value < least:
            expected = "0 or more" if least == 0 else "positive"
            raise ConfigError(f"--{key.replace('_', '-')}", f"{value} must be {expected}")
    device = pick_device(args.device)
    params = load_params(args.params, parse_overrides(args.overrides))
    tokens, T = Path(args.tokens), params.model.seq_len
    if "gpu_check" in args.only:
        check_gpu_run(args, device, params.train.log_every)
    if not (tokens / "train.bin").exists():
        n_tokens = min(1 << 20, max(1 << 16, 64 * params.train.batch_size * T))
        tokens = synthetic_tokens(folder / "tokens", params.tokenizer.vocab_size, n_tokens, T, params.seed)
    train = dataclasses.replace(params.train, device=str(device), micro_batch_size=0, compile=False, nproc_per_node=1)
    vocab = dataclasses.replace(params.tokenizer, vocab_size=int(load_meta(tokens)["vocab_size"]))
    params = dataclasses.replace(params, train=train, tokenizer=vocab)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device))
    return BenchSetup(params, study_params(params, args.study_shape, args.study_steps), tokens, folder, args, bf16)


def check_gpu_run(args: argparse.Namespace, device: torch.device, log_every: int) -> None:
    """gpu_check runs on CUDA (on a CPU only where --device cpu asks for it), with a timed window after the
    warm-up; on CUDA without token files it makes them (`dvc repro tokenize`) first."""
    if device.type != "cuda" and args.device != "cpu":
        raise ConfigError("--only gpu_check", f"needs CUDA, and torch {torch.__version__} sees no CUDA device; "
                          "`make gpu-check DRY_RUN=1` runs it on the CPU (--device cpu) at a tiny shape")
    if args.check_warmup < 0 or args.check_steps < args.check_warmup + 2 * log_every:
        raise ConfigError("--check-steps", f"{args.check_steps} leaves no timed window after --check-warmup "
                          f"{args.check_warmup} (needs --check-warmup + 2 x train.log_every={log_every})")
    if device.type == "cuda" and not (Path(args.tokens) / "train.bin").exists():
        print(f"bench: {args.tokens} is missing: running `dvc repro tokenize`", file=sys.stderr)
        if subprocess.run([sys.executable, "-m", "dvc", "repro", "tokenize"], check=False).returncode != 0:
            raise ConfigError("--tokens", "`dvc repro tokenize` failed; see its output above")


def study_params(params: Params, overrides: list[str], steps: int) -> Params:
    """params at STUDY_SHAPE with --study-shape KEY=N overrides (its keys only, N > 0), `steps` steps long."""
    shape = dict(STUDY_SHAPE)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in shape or not value.isdigit() or int(value) <= 0:
            raise ConfigError("--study-shape", f"{item!r}: expected KEY=N, N > 0, KEY one of {', '.join(shape)}")
        shape[key] = int(value)
    model = dataclasses.replace(params.model, **{key: shape[key] for key in SHAPE_KEYS})
    model.validate()
    train = dataclasses.replace(params.train, precision="auto", batch_size=shape["batch_size"],
                                max_tokens=steps * shape["batch_size"] * model.seq_len, eval_tokens=model.seq_len,
                                log_every=STUDY_LOG_EVERY, checkpoint_every_frac=0.5)
    vocab = dataclasses.replace(params.tokenizer, vocab_size=shape["vocab_size"])
    return dataclasses.replace(params, model=model, train=train, tokenizer=vocab)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports/bench.json")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--params", default="params.yaml", help="the recipe and the first shape")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, as `dvc exp run -S` (repeatable)")
    p.add_argument("--tokens", default="data/tokens", help="token folder; synthetic tokens where it is missing")
    p.add_argument("--study-shape", dest="study_shape", action="append", default=[], metavar="KEY=N",
                   help=f"override the study's shape (repeatable), default {STUDY_SHAPE}")
    p.add_argument("--study-steps", dest="study_steps", type=int, default=20, help="steps of study_loop's run")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per comparison")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--mm-size", dest="mm_size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--mm-seconds", dest="mm_seconds", type=float, default=2.0, help="time per peak measurement")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="the bf16 sections: auto = where bf16 is native (CUDA, CPUs with avx512_bf16/amx_bf16)")
    names = [name for name, _ in SECTIONS + OPT_IN]
    p.add_argument("--only", action="append", default=[], choices=names, metavar="SECTION",
                   help=f"run these sections alone (repeatable): {', '.join(names)}; default all but "
                        f"{' and '.join(name for name, _ in OPT_IN)}")
    p.add_argument("--check-steps", dest="check_steps", type=int, default=300, help="gpu_check's training steps")
    p.add_argument("--check-warmup", dest="check_warmup", type=int, default=50,
                   help="gpu_check's first steps, left out of its tokens/s (compilation, allocator, clocks)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # as the stages run (attnlab.core.memory)
    started = time.perf_counter()
    sections = [(name, run) for name, run in SECTIONS + OPT_IN if name in args.only] if args.only else SECTIONS
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-") as tmp:
        results = run_bench(build_setup(args, Path(tmp)), sections, log=lambda line: print(line, file=sys.stderr))
    write_json(args.out, results)
    print(format_table(results))
    print(f"bench: on {results['device']} in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
