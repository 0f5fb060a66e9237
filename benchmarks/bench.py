"""Throughput benchmark: attnlab's Transformer against torch.nn.TransformerEncoder, side by side in one run.

    python -m benchmarks.bench --out reports/bench.json        # `make bench`

The benchmark is a list of named sections (``SECTIONS``). Each section is a function
``(setup, results) -> dict``: it reads the shared :class:`BenchSetup` and the figures of the sections before
it, and returns new flat keys for reports/bench.json. A later issue adds a section with one line, e.g.
``SECTIONS.append(("compile", compile_section))``.

Sections today:
- train_fp32 / train_bf16: training tokens/s (forward, backward, AdamW step) of attnlab and of the torch
  reference at the same shape, alternating repetitions so both see the same machine load;
- attention_paths: forward-only tokens/s of the fused SDPA path against the explicit (capturable) path;
- mfu: achieved FLOP/s (attnlab.model.flops_per_token) as a share of the matmul peak measured in this run
  (CPU) or of the dense bf16 peak table (CUDA);
- bf16_loss: the same short training run in fp32 and under bf16 autocast from one init on the same batches,
  with a second fp32 init seed as the yardstick for "within noise".

Then, when the project's token files exist, the quality section (benchmarks/bench_quality.py): the train stage's
recipe against a plain reference GPT at the shape of `--params` plus `--set key=value` overrides (`make bench`
passes the quick profile), both scored on evaluate's windows: ``quality_vs_reference`` (goal <= 1.0); and at
that shape the train stage's loop against the bare step of its model (``train_loop_vs_step``, goal >= 0.95)
and against the reference GPT's training loop (``stage_vs_reference_speed``, goal >= 1.0), all three timed in
interleaved windows of one run (bench_quality.Interleaved).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from attnlab.analysis.capture import explicit_attention
from attnlab.core.cli import run_cli
from attnlab.core.device import keep_freed_memory, native_bf16, pick_device
from attnlab.core.errors import ConfigError
from attnlab.core.io import write_json
from attnlab.core.params import ModelConfig, TrainConfig, load_params
from attnlab.data.tokens import batch_starts, check_length, load_meta, load_tokens, windows
from attnlab.model.transformer import Transformer, count_parameters, flops_per_token, lm_loss
from attnlab.training.schedule import fused_adamw

# Dense bf16 tensor-core peak in FLOP/s (no sparsity), matched against torch.cuda.get_device_name().
CUDA_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
CPU_SHAPE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=256)  # small enough for 2 cores
CPU_BATCH = 8
DEFAULT_VOCAB = 8192  # params.yaml tokenizer.vocab_size; data/tokens/meta.json wins when it exists


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class BenchSetup:
    cfg: ModelConfig
    vocab_size: int
    batch_size: int
    steps: int  # timed training steps per repetition and model
    reps: int  # repetitions, alternating between the models compared
    warmup: int  # untimed steps before the first repetition
    loss_steps: int  # length of the fp32 / bf16 training runs of the bf16_loss section
    mm_size: int  # n of the n x n matmul that measures the peak
    mm_seconds: float  # time spent measuring each peak (fp32, bf16)
    device: torch.device
    token_stream: np.ndarray  # (N,) token ids the batches are cut from
    token_source: str
    seed: int
    bf16: bool = True  # run the bf16 sections (off where bf16 is only emulated: hours instead of seconds)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.cfg.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of batch `step`: two (B, T) int64 tensors on the device, a function of (seed, step)."""
        starts = batch_starts(len(self.token_stream), self.cfg.seq_len, self.batch_size, self.seed, step)
        x, y = windows(self.token_stream, starts, self.cfg.seq_len)
        return x.to(self.device), y.to(self.device)


Section = Callable[[BenchSetup, dict], dict]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def synthetic_stream(vocab_size: int, n_tokens: int, seed: int) -> np.ndarray:
    """A token stream with structure a model can learn: a sparse Markov chain plus copied spans.

    Each token has 4 possible successors (probabilities .6/.2/.1/.1); every ~64 tokens a span of 16 earlier
    tokens is repeated verbatim, which rewards attention to the past (induction). (N,) uint16.
    """
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))  # (V, 4)
    choice = rng.choice(4, size=n_tokens, p=[0.6, 0.2, 0.1, 0.1])  # (N,)
    out = np.empty(n_tokens, dtype=np.int64)
    out[0] = 0
    t = 1
    while t < n_tokens:
        if t > 256 and rng.random() < 1 / 64:
            start = int(rng.integers(0, t - 16))
            span = out[start : start + 16][: n_tokens - t]
            out[t : t + len(span)] = span
            t += len(span)
        else:
            out[t] = successors[out[t - 1], choice[t]]
            t += 1
    return out.astype(np.uint16)


def token_stream(
    tokens_dir: str | None, seq_len: int, vocab_size: int, seed: int, n_synthetic: int
) -> tuple[np.ndarray, str, int]:
    """Real train tokens when data/tokens exists (their vocabulary wins), else the synthetic stream."""
    if tokens_dir and (Path(tokens_dir) / "train.bin").exists():
        meta = load_meta(tokens_dir)
        stream = load_tokens(tokens_dir, "train")
        check_length(stream, seq_len, "train")
        return stream, f"{tokens_dir}/train.bin", int(meta["vocab_size"])
    return synthetic_stream(vocab_size, n_synthetic, seed), "synthetic", vocab_size


# ------------------------------------------------------------------------------------ the torch reference


class TorchEncoderLM(nn.Module):
    """The speed reference: embedding, torch.nn.TransformerEncoder with a causal mask, tied output head.

    Same shape and parameter count as attnlab's Transformer with pe=rope (no positional parameters):
    post-norm unless cfg.norm == "pre" (norm_first, plus a final LayerNorm as attnlab's ln_f), GELU MLP.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        D = cfg.d_model
        self.d_model = D
        self.tok_emb = nn.Embedding(vocab_size, D)
        layer = nn.TransformerEncoderLayer(
            D, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, activation="gelu", batch_first=True,
            norm_first=cfg.norm == "pre",
        )
        final_norm = nn.LayerNorm(D) if cfg.norm == "pre" else None
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=final_norm, enable_nested_tensor=False)
        mask = nn.Transformer.generate_square_subsequent_mask(cfg.seq_len)  # (T, T) 0 / -inf
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx) * math.sqrt(self.d_model)  # (B, T, D)
        x = self.encoder(x, mask=self.causal_mask[:T, :T], is_causal=True)  # (B, T, D)
        return x @ self.tok_emb.weight.t()  # (B, T, V)


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The same AdamW for every model compared: the train stage's defaults and kernel (fused where supported)."""
    train = TrainConfig()
    fused = fused_adamw(next(model.parameters()).device)
    return torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay,
        fused=fused or None,
    )


def train_step_fn(model: nn.Module, device: torch.device, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model.train()
    optimizer = make_optimizer(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:  # (B, T) inputs and targets
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def side_by_side(setup: BenchSetup, runs: dict[str, Callable[[int], None]]) -> dict[str, float]:
    """Median tokens/s of each run(step), alternating repetitions (order reversed every other one)."""
    names = list(runs)
    for name in names:
        for i in range(setup.warmup):
            runs[name](i)
    sync(setup.device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(setup.reps):
        for name in names if rep % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for i in range(setup.steps):
                runs[name](rep * setup.steps + i)
            sync(setup.device)
            samples[name].append(setup.steps * setup.tokens_per_step / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def training_throughput(setup: BenchSetup, bf16: bool) -> tuple[float, float]:
    torch.manual_seed(setup.seed)
    attnlab_model = Transformer(setup.cfg, setup.vocab_size).to(setup.device)
    reference = TorchEncoderLM(setup.cfg, setup.vocab_size).to(setup.device)
    batches = [setup.batch(i) for i in range(4)]
    steps = {"attnlab": train_step_fn(attnlab_model, setup.device, bf16), "torch": train_step_fn(reference, setup.device, bf16)}
    tok_s = side_by_side(setup, {name: (lambda i, f=f: f(*batches[i % 4])) for name, f in steps.items()})
    return tok_s["attnlab"], tok_s["torch"]


# ---------------------------------------------------------------------------------------------- sections


def train_fp32(setup: BenchSetup, results: dict) -> dict:
    ours, ref = training_throughput(setup, bf16=False)
    return {"train_tok_s": ours, "torch_encoder_tok_s": ref, "train_vs_torch_encoder": ours / ref}


def train_bf16(setup: BenchSetup, results: dict) -> dict:
    if not setup.bf16:
        return {"bf16_skipped": f"no native bf16 on {device_name(setup.device)} (see --bf16)"}
    ours, ref = training_throughput(setup, bf16=True)
    return {"train_tok_s_bf16": ours, "torch_encoder_tok_s_bf16": ref, "train_vs_torch_encoder_bf16": ours / ref}


def attention_paths(setup: BenchSetup, results: dict) -> dict:
    torch.manual_seed(setup.seed)
    model = Transformer(setup.cfg, setup.vocab_size).to(setup.device).eval()
    x, _ = setup.batch(0)

    @torch.no_grad()
    def fused(i: int) -> None:
        model(x)

    @torch.no_grad()
    def explicit(i: int) -> None:
        with explicit_attention(model):
            model(x)

    tok_s = side_by_side(setup, {"sdpa": fused, "explicit": explicit})
    return {
        "sdpa_fwd_tok_s": tok_s["sdpa"],
        "explicit_fwd_tok_s": tok_s["explicit"],
        "explicit_vs_sdpa_fwd": tok_s["explicit"] / tok_s["sdpa"],
    }


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of an n x n x n torch.mm in `dtype`: best of 5 timed rounds of about seconds/5 each."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    start = time.perf_counter()
    torch.mm(a, b)
    sync(device)
    iters = max(1, int(seconds / 5 / (time.perf_counter() - start)))  # the first call includes warm-up: an overestimate
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def table_bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in CUDA_BF16_PEAK.items() if key in name), None)


def mfu(setup: BenchSetup, results: dict) -> dict:
    n_params = count_parameters(setup.cfg, setup.vocab_size)
    per_token = flops_per_token(setup.cfg, n_params)
    peak_fp32 = matmul_flops(setup.device, torch.float32, setup.mm_size, setup.mm_seconds)
    out = {"n_params": n_params, "flops_per_token": per_token, "matmul_peak_fp32_flop_s": peak_fp32}
    if setup.bf16:  # an emulated bf16 matmul of mm_size takes tens of seconds: measured only where native
        peak_bf16_measured = matmul_flops(setup.device, torch.bfloat16, setup.mm_size, setup.mm_seconds)
        peak_bf16 = table_bf16_peak(setup.device) or peak_bf16_measured
        out.update({
            "matmul_peak_bf16_flop_s": peak_bf16_measured,
            "bf16_peak_source": "table" if table_bf16_peak(setup.device) else "measured",
            "matmul_bf16_vs_fp32": peak_bf16_measured / peak_fp32,
        })
    if "train_tok_s" in results:
        out["achieved_flop_s_fp32"] = results["train_tok_s"] * per_token
        out["mfu_fp32"] = out["achieved_flop_s_fp32"] / peak_fp32
        out["torch_encoder_mfu_fp32"] = results["torch_encoder_tok_s"] * per_token / peak_fp32
    if "train_tok_s_bf16" in results:
        out["achieved_flop_s_bf16"] = results["train_tok_s_bf16"] * per_token
        out["mfu_bf16"] = out["achieved_flop_s_bf16"] / peak_bf16
        out["torch_encoder_mfu_bf16"] = results["torch_encoder_tok_s_bf16"] * per_token / peak_bf16
    return out


def loss_curve(setup: BenchSetup, init_seed: int, bf16: bool) -> list[float]:
    """Per-step training loss of attnlab's model from init `init_seed` on batches 0..loss_steps-1."""
    torch.manual_seed(init_seed)
    model = Transformer(setup.cfg, setup.vocab_size).to(setup.device)
    optimizer = make_optimizer(model)
    peak_lr, warmup = optimizer.param_groups[0]["lr"], max(1, setup.loss_steps // 10)
    losses = []
    for step in range(setup.loss_steps):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / warmup)
        x, y = setup.batch(10_000 + step)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TrainConfig().grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss at step {step} ({'bf16' if bf16 else 'fp32'})")
    return losses


def bf16_loss(setup: BenchSetup, results: dict) -> dict:
    """fp32 vs bf16 autocast from the same init on the same batches; another fp32 init seed gives the noise."""
    if not setup.bf16:
        return {}
    fp32 = loss_curve(setup, setup.seed, bf16=False)
    bf16 = loss_curve(setup, setup.seed, bf16=True)
    other_seed = loss_curve(setup, setup.seed + 1, bf16=False)
    tail = max(1, len(fp32) // 4)  # the last quarter of the run

    def tail_mean(curve: list[float]) -> float:
        return float(np.mean(curve[-tail:]))

    gap = tail_mean(bf16) - tail_mean(fp32)
    noise = abs(tail_mean(other_seed) - tail_mean(fp32))
    return {
        "loss_steps": setup.loss_steps,
        "loss_token_source": setup.token_source,
        "loss_fp32_final": tail_mean(fp32),
        "loss_bf16_final": tail_mean(bf16),
        "bf16_loss_gap": gap,  # bf16 - fp32, mean over the last quarter, nats/token
        "bf16_loss_gap_mean_abs": float(np.mean(np.abs(np.array(bf16) - np.array(fp32)))),  # whole curve
        "seed_loss_gap": noise,  # |other init seed - fp32|, the same window: run-to-run noise
        "bf16_within_noise": abs(gap) <= noise,
        "loss_curve_fp32": fp32,
        "loss_curve_bf16": bf16,
        "loss_curve_fp32_seed2": other_seed,
    }


def attention_analysis(setup: BenchSetup, results: dict) -> dict:
    """The attention_stats analysis (capture + statistics) against a plain forward and the loop formulation."""
    from benchmarks.bench_attention import attention_section

    cfg = setup.cfg
    shape = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff, seq_len=cfg.seq_len)
    rows = attention_section(shape=shape, vocab_size=setup.vocab_size, batch_size=setup.batch_size,
                             device=setup.device.type, seed=setup.seed)
    return {key: value for key, value in rows.items() if key not in ("device", "shape", "threads")}


def train_loop(setup: BenchSetup, results: dict) -> dict:
    from benchmarks.bench_quality import train_loop_at_bench_shape

    return train_loop_at_bench_shape(setup, results)


SECTIONS: list[tuple[str, Section]] = [
    ("train_fp32", train_fp32),
    ("train_loop", train_loop),
    ("train_bf16", train_bf16),
    ("attention_paths", attention_paths),
    ("mfu", mfu),
    ("bf16_loss", bf16_loss),
    ("attention_analysis", attention_analysis),
]


# ------------------------------------------------------------------------------------------ run and report


def run_bench(setup: BenchSetup, sections: list[tuple[str, Section]] | None = None, log=print) -> dict:
    """Run each section in order and merge their keys; returns the dict written to bench.json."""
    results: dict = {
        "device": device_name(setup.device),
        "torch_version": torch.__version__,
        "config": {
            **asdict(setup.cfg),
            "vocab_size": setup.vocab_size,
            "batch_size": setup.batch_size,
            "steps": setup.steps,
            "reps": setup.reps,
            "loss_steps": setup.loss_steps,
            "mm_size": setup.mm_size,
            "token_source": setup.token_source,
        },
        "section_seconds": {},
    }
    for name, section in SECTIONS if sections is None else sections:
        start = time.perf_counter()
        results.update(section(setup, results))
        results["section_seconds"][name] = round(time.perf_counter() - start, 2)
        log(f"bench: {name} done in {results['section_seconds'][name]:.1f} s")
    return results


TABLE = [  # (key, label, format)
    ("train_tok_s", "train tok/s fp32: attnlab", "{:,.0f}"),
    ("torch_encoder_tok_s", "train tok/s fp32: torch TransformerEncoder", "{:,.0f}"),
    ("train_vs_torch_encoder", "  attnlab / torch, fp32", "{:.2f}x"),
    ("train_tok_s_bf16", "train tok/s bf16 autocast: attnlab", "{:,.0f}"),
    ("torch_encoder_tok_s_bf16", "train tok/s bf16 autocast: torch", "{:,.0f}"),
    ("train_vs_torch_encoder_bf16", "  attnlab / torch, bf16", "{:.2f}x"),
    ("sdpa_fwd_tok_s", "forward tok/s, SDPA path", "{:,.0f}"),
    ("explicit_fwd_tok_s", "forward tok/s, explicit path", "{:,.0f}"),
    ("matmul_peak_fp32_flop_s", "matmul peak fp32 (GFLOP/s)", "gflops"),
    ("matmul_peak_bf16_flop_s", "matmul peak bf16 (GFLOP/s)", "gflops"),
    ("mfu_fp32", "MFU fp32", "{:.1%}"),
    ("mfu_bf16", "MFU bf16", "{:.1%}"),
    ("loss_fp32_final", "loss fp32 (last quarter, nats)", "{:.4f}"),
    ("loss_bf16_final", "loss bf16 (last quarter, nats)", "{:.4f}"),
    ("bf16_loss_gap", "  bf16 - fp32", "{:+.4f}"),
    ("seed_loss_gap", "  |seed 2 - seed 1| (noise)", "{:.4f}"),
    ("bf16_within_noise", "  bf16 within noise", "{}"),
    ("plain_forward_tok_s", "forward tok/s, fused, no capture", "{:,.0f}"),
    ("analysis_tok_s", "attention analysis tok/s (capture + stats)", "{:,.0f}"),
    ("analysis_vs_forward", "  analysis cost / forward (goal <= 1.5)", "{:.2f}x"),
    ("loop_reference_tok_s", "original loop formulation tok/s", "{:,.0f}"),
    ("loop_reference_matches", "  loop gives the same numbers", "{}"),
    ("peak_memory_grows_with_n_examples", "peak memory grows with n_examples", "{}"),
    ("quality_unigram_loss", "quality: unigram baseline (nats)", "{:.4f}"),
    ("quality_attnlab_val_loss", "quality: attnlab val loss (nats)", "{:.4f}"),
    ("quality_reference_val_loss", "quality: reference GPT val loss (nats)", "{:.4f}"),
    ("quality_vs_reference", "  attnlab / reference (goal <= 1.0)", "{:.3f}"),
    ("train_loop_tok_s_bench_shape", "train stage loop tok/s, bench shape (no validation)", "{:,.0f}"),
    ("bare_step_tok_s_bench_shape", "bare fwd+bwd+AdamW step tok/s, interleaved, bench shape", "{:,.0f}"),
    ("train_loop_vs_step_bench_shape", "  loop / bare step, bench shape", "{:.2f}x"),
    ("train_loop_tok_s", "train stage loop tok/s, quality shape (no validation)", "{:,.0f}"),
    ("bare_step_tok_s", "bare fwd+bwd+AdamW step tok/s, interleaved, same model", "{:,.0f}"),
    ("train_loop_vs_step", "  loop / bare step (goal >= 0.95)", "{:.2f}x"),
    ("reference_loop_tok_s", "reference GPT training loop tok/s, interleaved", "{:,.0f}"),
    ("stage_vs_reference_speed", "  stage loop / reference (goal >= 1.0)", "{:.2f}x"),
    ("quality_reference_tok_s", "reference GPT tok/s, its whole run alone", "{:,.0f}"),
]


def format_table(results: dict) -> str:
    rows = [f"device: {results['device']}"]
    width = max(len(label) for _, label, _ in TABLE)
    for key, label, fmt in TABLE:
        if key in results:
            value = results[key]
            text = f"{value / 1e9:,.1f}" if fmt == "gflops" else fmt.format(value)
            rows.append(f"{label:<{width}}  {text}")
    return "\n".join(rows)


def build_setup(args: argparse.Namespace) -> BenchSetup:
    device = pick_device(args.device)
    base = {} if device.type == "cuda" else CPU_SHAPE  # CUDA: the study's default shape from ModelConfig
    shape = {key: getattr(args, key) if getattr(args, key) is not None else base.get(key) for key in CPU_SHAPE}
    cfg = ModelConfig(**{k: v for k, v in shape.items() if v is not None}, pe=args.pe, norm=args.norm)
    cfg.validate()
    batch_size = args.batch_size or (TrainConfig().batch_size if device.type == "cuda" else CPU_BATCH)
    for key in ("batch_size", "steps", "reps", "loss_steps", "mm_size", "vocab_size"):
        value = batch_size if key == "batch_size" else getattr(args, key)
        if value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}", f"{value} must be at least 1")
    if not args.mm_seconds > 0:
        raise ConfigError("--mm-seconds", f"{args.mm_seconds} must be positive")
    if args.warmup < 0:
        raise ConfigError("--warmup", f"{args.warmup} must be 0 or more")
    n_synthetic = min(1 << 20, max(1 << 16, 64 * batch_size * cfg.seq_len))
    stream, source, vocab_size = token_stream(args.tokens, cfg.seq_len, args.vocab_size, args.seed, n_synthetic)
    return BenchSetup(
        cfg=cfg, vocab_size=vocab_size, batch_size=batch_size, steps=args.steps, reps=args.reps,
        warmup=args.warmup, loss_steps=args.loss_steps, mm_size=args.mm_size, mm_seconds=args.mm_seconds, device=device,
        token_stream=stream, token_source=source, seed=args.seed,
        bf16=args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device)),
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports/bench.json")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--d-model", dest="d_model", type=int, help="CPU default 256; CUDA: params default")
    p.add_argument("--n-layers", dest="n_layers", type=int, help="CPU default 4")
    p.add_argument("--n-heads", dest="n_heads", type=int, help="CPU default 4")
    p.add_argument("--d-ff", dest="d_ff", type=int, help="CPU default 1024")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="CPU default 256")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="CPU default 8; CUDA: train.batch_size")
    p.add_argument("--pe", default=ModelConfig.pe)
    p.add_argument("--norm", default=ModelConfig.norm)
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=DEFAULT_VOCAB,
                   help="used with the synthetic stream; real tokens bring their own")
    p.add_argument("--tokens", default="data/tokens", help="token folder for the bf16 loss run, if present")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per comparison")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--loss-steps", dest="loss_steps", type=int, default=40, help="steps of the fp32/bf16 loss runs")
    p.add_argument("--mm-size", dest="mm_size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--mm-seconds", dest="mm_seconds", type=float, default=2.0, help="time per peak measurement")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="the bf16 sections: auto = where bf16 is native (CUDA, CPUs with avx512_bf16/amx_bf16)")
    p.add_argument("--params", default="params.yaml", help="params of the quality section's two training runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param of the quality section, as `dvc exp run -S` (repeatable)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the quality section")
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    """["model.d_model=128", "seed=2"] -> {"model": {"d_model": 128}, "seed": 2} (values parsed as YAML)."""
    nested: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"{item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return nested


def quality(args: argparse.Namespace, log) -> dict:
    """The quality section, or a note saying why it was skipped."""
    if not (Path(args.tokens) / "train.bin").exists():
        log(f"bench: quality skipped: no token files in {args.tokens} (run `make quick` first)")
        return {"quality_skipped": f"no token files in {args.tokens}"}
    from benchmarks.bench_quality import quality_comparison

    params = load_params(args.params, parse_overrides(args.overrides))
    return quality_comparison(params, args.tokens, log=log)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    setup = build_setup(args)
    if setup.device.type == "cpu":  # the allocator setting the train stage uses, for every model measured here
        keep_freed_memory()
    started = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    results = run_bench(setup, log=log)
    if args.quality:
        start = time.perf_counter()
        results.update(quality(args, log))
        results["section_seconds"]["quality"] = round(time.perf_counter() - start, 2)
    write_json(args.out, results)
    print(format_table(results))
    print(f"bench: {len(SECTIONS)} sections on {results['device']} in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
