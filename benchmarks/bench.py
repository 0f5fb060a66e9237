"""`make bench`: attnlab's training step, loop and attention paths against references, side by side in one run.

    python -m benchmarks.bench --out reports/bench.json --set model.d_model=128 ...   # `make bench`

``SECTIONS``, each (setup, results) -> flat keys of reports/bench.json, run at the bench shape (CPU_SHAPE on a
CPU, the params' model on CUDA, or the shape flags) on the token files (synthetic ones where there are none),
the things compared alternating (common.side_by_side):

- train_fp32 / train_bf16: the train stage's step (loop.train_step) on attnlab's model and on
  torch.nn.TransformerEncoder (benchmarks/reference.py);
- study_loop: at the study's shape (STUDY_SHAPE, 4 x 4 x 512 at d_model 128), the stage's loop against its step
  and the reference GPT's loop, each at its best precision here (as the quality section does at the quick shape);
- attention_paths: SDPA forward against the explicit (capturable) one; attention_analysis: bench_attention.py;
- mfu: achieved FLOP/s (flops_per_token) over the matmul peak measured here, or a known GPU's bf16 peak;
- quality (bench_quality.py, where token files exist): at the shape of --params and --set (`make bench`: the
  quick profile), with the stage's whole loop against its step and the reference GPT's loop.

bf16 against fp32 in quality is `make precision-seeds`' (benchmarks/precision_seeds.py): whole runs, paired seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from attnlab.analysis.capture import explicit_attention
from attnlab.core.cli import run_cli
from attnlab.core.device import native_bf16, pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_json
from attnlab.core.memory import keep_freed_memory
from attnlab.core.params import Params, load_params
from attnlab.data.tokens import load_meta, load_tokens
from attnlab.model.transformer import Transformer, count_parameters, flops_per_token
from benchmarks.bench_attention import attention_section
from benchmarks.bench_quality import quality_comparison
from benchmarks.common import (LoopTimer, Step, device_name, loop_speed_keys, matmul_flops, parse_overrides,
                               reference_steps, side_by_side, stage_step, synthetic_tokens, table_bf16_peak,
                               train_stage)
from benchmarks.reference import ReferenceShape, TorchEncoderLM

CPU_SHAPE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=256)  # small enough for 2 cores
CPU_BATCH = 8
# study_loop: the study's shape (one trial of shared/README.md: d_model 128, d_ff 512, 4 x 4 x 512, vocab 8,192,
# batch 32), its loop against its step and the reference, in windows of STUDY_LOG_EVERY of STUDY_STEPS steps
STUDY_SHAPE = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, seq_len=512, batch_size=32, vocab_size=8192)
STUDY_STEPS, STUDY_LOG_EVERY = 20, 4


@dataclass
class BenchSetup:
    params: Params  # the bench shape, batch, seed and device on the recipe of --params
    tokens: Path
    token_source: str
    folder: Path  # temporary: the outputs of each stage set-up
    args: argparse.Namespace  # steps, reps, warmup, mm_size, mm_seconds, tokens
    quality_params: Params  # --params with the --set overrides
    bf16: bool  # run the bf16 sections (off where bf16 is emulated: hours instead of seconds)
    study_shape: dict  # study_loop's shape: STUDY_SHAPE with --study-shape

    @property
    def device(self) -> torch.device:
        return torch.device(self.params.train.device)

    @property
    def tokens_per_step(self) -> int:
        return self.params.train.batch_size * self.params.model.seq_len

    def step(self, name: str, precision: str, model: torch.nn.Module | None = None) -> Step:
        """The stage's step at the bench shape (eager, a 1000-step schedule), on `model` if given."""
        train = dataclasses.replace(self.params.train, precision=precision, max_tokens=1000 * self.tokens_per_step)
        return stage_step(dataclasses.replace(self.params, train=train), self.tokens, self.folder / name, model)

    def compare(self, runs: dict[str, Step]) -> dict[str, float]:
        a = self.args
        return side_by_side(runs, a.steps, a.reps, a.warmup, self.tokens_per_step, self.device)


Section = Callable[[BenchSetup, dict], dict]


def training_throughput(setup: BenchSetup, precision: str) -> dict:
    """Tokens/s of the stage's step on attnlab's model and on the torch encoder, alternating; keys end in _bf16
    for bf16."""
    torch.manual_seed(setup.params.seed)
    encoder = TorchEncoderLM(setup.params.model, setup.params.tokenizer.vocab_size)
    tok_s = setup.compare({"attnlab": setup.step(f"attnlab_{precision}", precision),
                           "torch": setup.step(f"torch_{precision}", precision, model=encoder)})
    suffix = "_bf16" if precision == "bf16" else ""
    return {f"train_tok_s{suffix}": tok_s["attnlab"], f"torch_encoder_tok_s{suffix}": tok_s["torch"],
            f"train_vs_torch_encoder{suffix}": tok_s["attnlab"] / tok_s["torch"]}


def train_fp32(setup: BenchSetup, results: dict) -> dict:
    return training_throughput(setup, "fp32")


def train_bf16(setup: BenchSetup, results: dict) -> dict:
    if not setup.bf16:
        return {"bf16_skipped": f"no native bf16 on {device_name(setup.device)} (see --bf16)"}
    return training_throughput(setup, "bf16")


def study_loop(setup: BenchSetup, results: dict) -> dict:
    """The stage's train() at the study's shape (--study-shape) on synthetic tokens of its vocabulary, at its own
    precision (train.precision auto), against its bare step and the reference GPT's loop (fp32, and bf16 where
    native), timed side by side window by window (LoopTimer); keys end in _study_shape."""
    shape = setup.study_shape
    cfg = dataclasses.replace(setup.params.model, **{k: shape[k] for k in CPU_SHAPE})
    tokens = synthetic_tokens(setup.folder / "study_tokens", shape["vocab_size"], max(1 << 18, 64 * shape["batch_size"]
                              * cfg.seq_len), cfg.seq_len, setup.params.seed)
    steps, per_step = setup.args.study_steps, shape["batch_size"] * cfg.seq_len
    train = dataclasses.replace(setup.params.train, precision="auto", batch_size=shape["batch_size"],
                                max_tokens=steps * per_step, log_every=STUDY_LOG_EVERY, checkpoint_every_frac=0.5)
    params = dataclasses.replace(setup.params, model=cfg, train=train, tokenizer=dataclasses.replace(
        setup.params.tokenizer, vocab_size=shape["vocab_size"]))
    reference = ReferenceShape(shape["vocab_size"], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.seq_len)
    partners = {"bare_step": stage_step(params, tokens, setup.folder / "study_bare"),
                **reference_steps(reference, load_tokens(tokens, "train"), steps, shape["batch_size"],
                                  params.seed + 1, setup.device, setup.bf16)}
    timer = LoopTimer(partners, setup.device, after_step=STUDY_LOG_EVERY)  # the first window holds the warm-up
    metrics, _ = train_stage(params, tokens, on_log=timer)
    return {"study_shape": ", ".join(f"{key} {value}" for key, value in shape.items()),
            **loop_speed_keys(timer.tok_s(), metrics["precision"], "_study_shape")}


def attention_paths(setup: BenchSetup, results: dict) -> dict:
    cfg, vocab, batch = setup.params.model, setup.params.tokenizer.vocab_size, setup.params.train.batch_size
    torch.manual_seed(setup.params.seed)
    model = Transformer(cfg, vocab).to(setup.device).eval()
    x = torch.randint(0, vocab, (batch, cfg.seq_len), device=setup.device)  # (B, T)

    @torch.no_grad()
    def explicit(i: int) -> None:
        with explicit_attention(model):
            model(x)

    tok_s = setup.compare({"sdpa": torch.no_grad()(lambda i: model(x)), "explicit": explicit})
    return {"sdpa_fwd_tok_s": tok_s["sdpa"], "explicit_fwd_tok_s": tok_s["explicit"],
            "explicit_vs_sdpa_fwd": tok_s["explicit"] / tok_s["sdpa"]}


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


def attention_analysis(setup: BenchSetup, results: dict) -> dict:
    shape = {key: getattr(setup.params.model, key) for key in CPU_SHAPE}
    return attention_section(shape, setup.params.tokenizer.vocab_size, setup.params.train.batch_size,
                             setup.device.type, setup.params.seed)


def quality(setup: BenchSetup, results: dict) -> dict:
    """The quality section, or a note saying why it is skipped."""
    if not (Path(setup.args.tokens) / "train.bin").exists():
        return {"quality_skipped": f"no token files in {setup.args.tokens} (run `make quick` first)"}
    return quality_comparison(setup.quality_params, setup.args.tokens, reference_bf16=setup.bf16)


SECTIONS: list[tuple[str, Section]] = [
    ("train_fp32", train_fp32), ("study_loop", study_loop), ("train_bf16", train_bf16),
    ("attention_paths", attention_paths), ("mfu", mfu),
    ("attention_analysis", attention_analysis), ("quality", quality),
]


def run_bench(setup: BenchSetup, sections: list[tuple[str, Section]] = SECTIONS, log=print) -> dict:
    """Runs each section in order and merges their keys: the dict written to bench.json."""
    knobs = {key: getattr(setup.args, key) for key in ("steps", "reps", "mm_size")}
    results: dict = {
        "device": device_name(setup.device), "torch_version": torch.__version__,
        "config": {**asdict(setup.params.model), "vocab_size": setup.params.tokenizer.vocab_size,
                   "batch_size": setup.params.train.batch_size, **knobs, "token_source": setup.token_source},
        "section_seconds": {},
    }
    for name, section in sections:
        start = time.perf_counter()
        results.update(section(setup, results))
        results["section_seconds"][name] = round(time.perf_counter() - start, 2)
        log(f"bench: {name} done in {results['section_seconds'][name]:.1f} s")
    return results


def format_table(results: dict) -> str:
    """Every single figure of the results, one a line (the curves and the config stay in the JSON)."""
    rows = {key: value for key, value in results.items() if isinstance(value, (int, float, str))}
    width = max(map(len, rows))
    return "\n".join(f"{key:<{width}}  {show(value)}" for key, value in rows.items())


def show(value: object) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def build_setup(args: argparse.Namespace, folder: Path) -> BenchSetup:
    """The bench's params and token files; every input checked before any run."""
    for key in ("batch_size", "steps", "reps", "mm_size", "vocab_size", "mm_seconds", "warmup",
                "study_steps"):
        value = getattr(args, key)
        least = "0 or more" if key == "warmup" else "positive"
        if value is not None and not (value >= 0 if key == "warmup" else value > 0):
            raise ConfigError(f"--{key.replace('_', '-')}", f"{value} must be {least}")
    device = pick_device(args.device)
    base, quality_params = load_params(args.params), load_params(args.params, parse_overrides(args.overrides))
    default = asdict(base.model) if device.type == "cuda" else CPU_SHAPE
    shape = {key: default[key] if getattr(args, key) is None else getattr(args, key) for key in CPU_SHAPE}
    cfg = dataclasses.replace(base.model, **shape, pe=args.pe or base.model.pe, norm=args.norm or base.model.norm)
    cfg.validate()
    batch_size = args.batch_size or (base.train.batch_size if device.type == "cuda" else CPU_BATCH)
    tokens, source = Path(args.tokens), f"{args.tokens}/train.bin"
    if not (tokens / "train.bin").exists():
        n_tokens = min(1 << 20, max(1 << 16, 64 * batch_size * cfg.seq_len))
        tokens, source = folder / "tokens", "synthetic"
        synthetic_tokens(tokens, args.vocab_size, n_tokens, cfg.seq_len, args.seed)
    train = dataclasses.replace(base.train, device=str(device), batch_size=batch_size, micro_batch_size=0,
                                compile=False, eval_tokens=cfg.seq_len, nproc_per_node=1)
    vocab = dataclasses.replace(base.tokenizer, vocab_size=int(load_meta(tokens)["vocab_size"]))
    params = dataclasses.replace(base, seed=args.seed, model=cfg, train=train, tokenizer=vocab)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device))
    study = study_shape(args.study_shape)
    dataclasses.replace(base.model, **{key: study[key] for key in CPU_SHAPE}).validate()
    return BenchSetup(params, tokens, source, folder, args, quality_params, bf16, study)


def study_shape(overrides: list[str]) -> dict:
    """STUDY_SHAPE with --study-shape KEY=VALUE overrides (its keys only, positive integers)."""
    shape = dict(STUDY_SHAPE)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in shape or not value.isdigit() or int(value) <= 0:
            raise ConfigError("--study-shape", f"{item!r}: expected KEY=N, N > 0, KEY one of {', '.join(shape)}")
        shape[key] = int(value)
    return shape


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports/bench.json")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
    for key in CPU_SHAPE:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, help=f"CPU default {CPU_SHAPE[key]}; "
                       "CUDA: the params' model")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"CPU default {CPU_BATCH}; CUDA: train.batch_size")
    p.add_argument("--pe", help="default: the params' model.pe")
    p.add_argument("--norm", help="default: the params' model.norm")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=8192, help="of the synthetic tokens")
    p.add_argument("--tokens", default="data/tokens", help="token folder; synthetic tokens where it is missing")
    p.add_argument("--study-shape", dest="study_shape", action="append", default=[], metavar="KEY=N",
                   help=f"override study_loop's shape (repeatable), default {STUDY_SHAPE}")
    p.add_argument("--study-steps", dest="study_steps", type=int, default=STUDY_STEPS,
                   help="steps of study_loop's run")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per comparison")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--mm-size", dest="mm_size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--mm-seconds", dest="mm_seconds", type=float, default=2.0, help="time per peak measurement")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="the bf16 sections: auto = where bf16 is native (CUDA, CPUs with avx512_bf16/amx_bf16)")
    p.add_argument("--params", default="params.yaml", help="the recipe; and the quality section's shape")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param of the quality section, as `dvc exp run -S` (repeatable)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the quality section")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # as the stages run (attnlab.core.memory)
    started = time.perf_counter()
    sections = SECTIONS if args.quality else SECTIONS[:-1]
    with tempfile.TemporaryDirectory(prefix="attnlab-bench-") as tmp:
        results = run_bench(build_setup(args, Path(tmp)), sections, log=lambda line: print(line, file=sys.stderr))
    write_json(args.out, results)
    print(format_table(results))
    print(f"bench: on {results['device']} in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
