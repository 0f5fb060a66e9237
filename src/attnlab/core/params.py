"""Typed, validated configuration loaded from params.yaml.

Every stage calls :func:`load_params` once, before any heavy work. Each section of params.yaml is a frozen
dataclass; unknown keys, wrong types and impossible values raise :class:`ConfigError`, whose message names
the key (``model.d_model: 250 is not divisible by model.n_heads=4``). ``python -m attnlab.config`` prints
the resolved config and what it implies, or one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from attnlab.core.errors import ConfigError

PE_VARIANTS = ("rope", "rope_model_dim", "sinusoidal", "learned", "none", "complex", "alibi")
NORMS = ("post", "pre")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
QKV_PARTS = ("q", "k", "v")
MIN_VOCAB = 384  # 256 byte-fallback pieces + special pieces + the characters of a small corpus
MAX_VOCAB = 65535  # token files are uint16


@dataclass(frozen=True)
class CorpusConfig:
    sources: tuple[str, ...] = ()  # folders to read; empty = installed torch's .py files, then the stdlib's
    max_mb: float = 50.0  # stop gathering once this many MB of source are taken
    val_fraction: float = 0.05  # share of files (by stable hash of path) in the validation split
    max_file_kb: int = 512  # larger files are skipped (generated tables, vendored blobs)

    def validate(self) -> None:
        _positive("corpus.max_mb", self.max_mb)
        _positive("corpus.max_file_kb", self.max_file_kb)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("corpus.val_fraction", f"{self.val_fraction} must be between 0 and 1 (exclusive)")
        for i, src in enumerate(self.sources):
            path = Path(src).expanduser()
            if not path.is_dir():
                raise ConfigError(f"corpus.sources[{i}]", f"folder {src!r} does not exist")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8192  # SentencePiece BPE vocabulary, byte fallback included
    sample_mb: float = 8.0  # SentencePiece trains on a seeded sample of this many MB of the train split
    seed: int = 0  # seeds that sample; its own seed, so varying the global `seed` keeps the tokenizer

    def validate(self) -> None:
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(
                "tokenizer.vocab_size",
                f"{self.vocab_size} is outside [{MIN_VOCAB}, {MAX_VOCAB}]: SentencePiece with byte fallback "
                f"needs at least {MIN_VOCAB} pieces, and token files are uint16",
            )
        _positive("tokenizer.sample_mb", self.sample_mb)
        _non_negative("tokenizer.seed", self.seed)


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 448  # residual stream width
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024  # MLP hidden width
    seq_len: int = 512  # context length in tokens
    dropout: float = 0.0
    norm: str = "pre"  # pre: x + f(ln(x)) (learns best, docs/training.md); post: ln(x + f(x)) as the original study
    pe: str = "rope"  # one of PE_VARIANTS
    rope_base: float = 10000.0  # frequency base of rope / rope_model_dim / complex
    qkv_nonlinear_heads: tuple[str, ...] = ()  # "all", "L<layer>" or "L<layer>H<head>"; empty = linear Q/K/V
    qkv_nonlinear_parts: tuple[str, ...] = ("q", "k", "v")  # which projections become an MLP
    qkv_nonlinear_hidden: int = 64  # hidden width of each head's Q/K/V MLP

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "qkv_nonlinear_hidden"):
            _positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            raise ConfigError(
                "model.d_model", f"{self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"{self.dropout} must be in [0, 1)")
        _choice("model.norm", self.norm, NORMS)
        _choice("model.pe", self.pe, PE_VARIANTS)
        if self.pe in ("rope", "complex") and self.d_head % 2:
            raise ConfigError(
                "model.d_model",
                f"head dimension d_model/n_heads = {self.d_head} is odd; model.pe={self.pe} rotates pairs "
                "of dimensions and needs an even head dimension",
            )
        if self.pe in ("rope_model_dim", "sinusoidal") and self.d_model % 2:
            raise ConfigError("model.d_model", f"{self.d_model} is odd; model.pe={self.pe} needs it even")
        _positive("model.rope_base", self.rope_base)
        for part in self.qkv_nonlinear_parts:
            _choice("model.qkv_nonlinear_parts", part, QKV_PARTS)
        if len(set(self.qkv_nonlinear_parts)) != len(self.qkv_nonlinear_parts):
            raise ConfigError("model.qkv_nonlinear_parts", f"{list(self.qkv_nonlinear_parts)} repeats a part")
        if self.pe == "complex" and self.qkv_nonlinear_heads and {"q", "k"} & set(self.qkv_nonlinear_parts):
            raise ConfigError(
                "model.qkv_nonlinear_parts",
                "model.pe=complex applies Q and K as complex matrices, which have no GELU MLP form; "
                "use model.qkv_nonlinear_parts=[v] with it",
            )
        for spec in self.qkv_nonlinear_heads:
            parse_head_selector(spec, self.n_layers, self.n_heads, "model.qkv_nonlinear_heads")


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto: CUDA, then MPS, then CPU; or cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto: the faster where native bf16 (training.schedule.precision_choice); fp32; bf16
    compile: bool = True  # torch.compile on CUDA (ignored on CPU/MPS)
    batch_size: int = 32  # global batch in sequences (summed over all processes)
    micro_batch_size: int = 0  # per-process sequences per forward; 0 = the whole per-process batch
    lr: float = 0.001  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.05  # share of steps spent warming up linearly ...
    warmup_steps: int = 100  # ... but at least this many steps (capped at half the run): short runs need it
    weight_decay: float = 0.1  # AdamW decay on the weight matrices; never on biases and norms
    decay_embedding: bool = False  # also decay the (tied) token embedding
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    tokens_per_param: float = 20.0  # Chinchilla-style budget: train tokens = this * parameter count
    max_tokens: int = 0  # explicit token budget; 0 = use tokens_per_param
    eval_every_frac: float = 0.1  # validation loss for the loss curve every this share of the budget
    eval_tokens: int = 65536  # validation tokens used by each mid-run evaluation
    checkpoint_every_frac: float = 0.1  # checkpoint at least every this share of the budget
    checkpoint_every_min: float = 5.0  # ... and at least every this many minutes
    log_every: int = 10  # steps between logged rows (and host synchronisations)
    nproc_per_node: int = 1  # processes per node; >1 runs the train stage under torchrun (DDP)
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo

    def validate(self) -> None:
        dev = self.device
        if dev not in DEVICES and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ConfigError("train.device", f"{dev!r} is not one of {', '.join(DEVICES)} or cuda:N")
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.backend", self.backend, ("auto", "nccl", "gloo"))
        for key in ("batch_size", "lr", "tokens_per_param", "log_every", "nproc_per_node", "eval_tokens"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("micro_batch_size", "max_tokens", "weight_decay", "grad_clip", "warmup_steps"):
            _non_negative(f"train.{key}", getattr(self, key))
        for key in ("min_lr_ratio", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"train.{key}", f"{getattr(self, key)} must be in [0, 1]")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError("train.warmup_frac", f"{self.warmup_frac} must be in [0, 1)")
        for key in ("eval_every_frac", "checkpoint_every_frac"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"train.{key}", f"{getattr(self, key)} must be in (0, 1]")
        _positive("train.checkpoint_every_min", self.checkpoint_every_min)
        if self.batch_size % self.nproc_per_node:
            raise ConfigError(
                "train.batch_size",
                f"{self.batch_size} (the global batch) is not divisible by train.nproc_per_node="
                f"{self.nproc_per_node}",
            )
        per_rank = self.batch_size // self.nproc_per_node
        if self.micro_batch_size and per_rank % self.micro_batch_size:
            raise ConfigError(
                "train.micro_batch_size",
                f"{self.micro_batch_size} does not divide the per-process batch {per_rank}",
            )


@dataclass(frozen=True)
class EvalConfig:
    max_tokens: int = 1_000_000  # validation tokens scored (whole windows); 0 = the whole split
    length_test_tokens: int = 65536  # targets of the paired length test (whole windows); 0 = no test
    batch_size: int = 16
    prompts: tuple[str, ...] = ("import torch\n", "def forward(self, x):\n", "class ")
    sample_tokens: int = 160  # tokens generated per prompt: one forward pass each
    sample_temperature: float = 0.8
    sample_top_k: int = 50  # 0 = sample from the full distribution
    # The paired length test: the same targets scored with 1x, 2x, ... seq_len tokens of context (evaluate.py).
    context_multiples: tuple[int, ...] = (1, 2, 4)

    def validate(self) -> None:
        _non_negative("eval.max_tokens", self.max_tokens)
        _non_negative("eval.length_test_tokens", self.length_test_tokens)
        multiples = list(self.context_multiples)
        if not multiples or multiples[0] != 1 or any(b <= a for a, b in zip(multiples, multiples[1:])):
            raise ConfigError("eval.context_multiples", f"{multiples} must start at 1 and increase, e.g. [1, 2, 4]: "
                              "the paired length test compares each longer context with the trained one")
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.sample_tokens", self.sample_tokens)
        _positive("eval.sample_temperature", self.sample_temperature)
        _non_negative("eval.sample_top_k", self.sample_top_k)
        if not self.prompts:
            raise ConfigError("eval.prompts", "needs at least one prompt")


@dataclass(frozen=True)
class AnalysisConfig:
    # Seeds every sample the analyses draw (attention examples, intervention windows, probe examples, generated
    # text): its own seed, so experiments that differ only in `seed` are measured on the same tokens.
    seed: int = 0

    def validate(self) -> None:
        _non_negative("analysis.seed", self.seed)


@dataclass(frozen=True)
class AttentionConfig:
    n_examples: int = 64  # sequences of seq_len tokens analysed per split
    batch_size: int = 8  # sequences per forward pass (bounds memory)
    seq_len_filter: tuple[int, int] = (100, 150)  # [start, stop) query positions for the per-head histograms
    token_view_layer: int = 0  # head shown in attn_tokens.html
    token_view_head: int = 0
    token_view_position: int = -1  # query position shown in attn_tokens.html; -1 = the last

    def validate(self) -> None:
        _positive("attention.n_examples", self.n_examples)
        _positive("attention.batch_size", self.batch_size)
        if len(self.seq_len_filter) != 2:
            raise ConfigError("attention.seq_len_filter", "expected a list [start, stop)")
        start, stop = self.seq_len_filter
        if not 0 <= start < stop:
            raise ConfigError("attention.seq_len_filter", f"[{start}, {stop}) must satisfy 0 <= start < stop")


@dataclass(frozen=True)
class InterventionsConfig:
    n_eval_tokens: int = 65536  # validation tokens scored per intervention (whole sequences)
    mean_tokens: int = 65536  # train tokens used to compute each head's mean output (mean-ablation)
    batch_size: int = 8
    points_per_pass: int = 4  # sweep points scored in one forward pass, each on its own copy of the batch
    temperatures: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
    top_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 512)
    sample_tokens: int = 120  # tokens generated per prompt for intervention_samples.md

    def validate(self) -> None:
        _positive("interventions.n_eval_tokens", self.n_eval_tokens)
        _positive("interventions.mean_tokens", self.mean_tokens)
        _positive("interventions.batch_size", self.batch_size)
        _positive("interventions.points_per_pass", self.points_per_pass)
        _positive("interventions.sample_tokens", self.sample_tokens)
        if not self.temperatures:
            raise ConfigError("interventions.temperatures", "needs at least one temperature")
        if not self.top_k:
            raise ConfigError("interventions.top_k", "needs at least one k")
        for t in self.temperatures:
            if not t > 0:
                raise ConfigError("interventions.temperatures", f"{t} must be > 0")
        for k in self.top_k:
            if not k > 0:
                raise ConfigError("interventions.top_k", f"{k} must be > 0")


@dataclass(frozen=True)
class ProbeConfig:
    n_examples: int = 32  # sequences used for the position probe and dimension-variance figures
    ridge: float = 1.0  # L2 penalty of the linear position probe

    def validate(self) -> None:
        _positive("probe.n_examples", self.n_examples)
        _non_negative("probe.ridge", self.ridge)


@dataclass(frozen=True)
class HeadRolesConfig:
    n_sequences: int = 64  # random token sequences, each repeated once: the induction and duplicate scores
    top_k: int = 2  # induction heads mean-ablated by the causal check (and as many other heads of their layers)
    batch_size: int = 8  # sequences per forward pass (bounds memory)

    def validate(self) -> None:
        for key in ("n_sequences", "top_k", "batch_size"):
            _positive(f"head_roles.{key}", getattr(self, key))


EXPLORER_MIN_TOKENS = 20  # the explorer always shows at least this many tokens (fewer only if seq_len is shorter)


@dataclass(frozen=True)
class ExplorerConfig:
    n_examples: int = 4  # the first validation examples of attention_stats shown in reports/explorer.html
    max_tokens: int = 192  # each example cropped to its first max_tokens positions: the file grows with its square

    def validate(self) -> None:
        _positive("explorer.n_examples", self.n_examples)
        if self.max_tokens < EXPLORER_MIN_TOKENS:
            raise ConfigError(
                "explorer.max_tokens",
                f"{self.max_tokens} is below {EXPLORER_MIN_TOKENS}: the explorer shows at least "
                f"{EXPLORER_MIN_TOKENS} tokens of each example",
            )


@dataclass(frozen=True)
class CompareConfig:
    seeds: int = 3  # seeds per variant in `make compare` and `make sweep`: mean ± std over seeds 1..seeds

    def validate(self) -> None:
        _positive("compare.seeds", self.seeds)


@dataclass(frozen=True)
class Params:
    seed: int = 1337
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    head_roles: HeadRolesConfig = field(default_factory=HeadRolesConfig)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self) -> None:
        _non_negative("seed", self.seed)
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        stop = self.attention.seq_len_filter[1]
        if stop > self.model.seq_len:
            raise ConfigError(
                "attention.seq_len_filter",
                f"[{self.attention.seq_len_filter[0]}, {stop}) reaches beyond model.seq_len={self.model.seq_len}",
            )
        if not 0 <= self.attention.token_view_layer < self.model.n_layers:
            raise ConfigError("attention.token_view_layer", f"must be in [0, model.n_layers={self.model.n_layers})")
        if not 0 <= self.attention.token_view_head < self.model.n_heads:
            raise ConfigError("attention.token_view_head", f"must be in [0, model.n_heads={self.model.n_heads})")
        if not -self.model.seq_len <= self.attention.token_view_position < self.model.seq_len:
            raise ConfigError("attention.token_view_position", "must index a position below model.seq_len")
        if self.explorer.n_examples > self.attention.n_examples:
            raise ConfigError(
                "explorer.n_examples",
                f"{self.explorer.n_examples} is more than attention.n_examples={self.attention.n_examples}: the "
                "explorer shows the first validation examples of attention_stats, which analyses that many",
            )
        n_heads = self.model.n_layers * self.model.n_heads
        if self.head_roles.top_k >= n_heads:
            raise ConfigError(
                "head_roles.top_k",
                f"{self.head_roles.top_k} is not below model.n_layers x model.n_heads = {n_heads}: the causal check "
                "ablates as many other heads of the same layers as a control",
            )
        if self.interventions.n_eval_tokens < self.model.seq_len:
            raise ConfigError(
                "interventions.n_eval_tokens",
                f"{self.interventions.n_eval_tokens} is below one sequence (model.seq_len={self.model.seq_len})",
            )
        if self.interventions.mean_tokens < self.model.seq_len:
            raise ConfigError(
                "interventions.mean_tokens",
                f"{self.interventions.mean_tokens} is below one sequence (model.seq_len={self.model.seq_len})",
            )


def parse_head_selector(spec: str, n_layers: int, n_heads: int, key: str) -> list[tuple[int, int]]:
    """'all' -> every (layer, head); 'L2' -> all heads of layer 2; 'L2H1' -> one head."""
    import re

    if spec == "all":
        return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    match = re.fullmatch(r"L(\d+)(?:H(\d+))?", spec)
    if not match:
        raise ConfigError(key, f"{spec!r} is not 'all', 'L<layer>' or 'L<layer>H<head>'")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise ConfigError(key, f"{spec!r}: layer {layer} does not exist (model.n_layers={n_layers})")
    if match.group(2) is None:
        return [(layer, head) for head in range(n_heads)]
    head = int(match.group(2))
    if head >= n_heads:
        raise ConfigError(key, f"{spec!r}: head {head} does not exist (model.n_heads={n_heads})")
    return [(layer, head)]


# ----------------------------------------------------------------------------------------------- loading


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read, type-check and validate params.yaml. Raises ConfigError naming the key or the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(str(path), f"is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"must be a YAML mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    params = _build(Params, raw, "")
    params.validate()
    return params


def params_to_dict(params: Params) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(params)))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            name = f"{prefix}{key}"
            what = "section" if not prefix else "key"
            raise ConfigError(name, f"unknown {what}; expected one of: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a section (mapping), got {_describe(value)}")
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not bad input


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(key, f"{value} must be > 0")


def _non_negative(key: str, value) -> None:
    if value < 0:
        raise ConfigError(key, f"{value} must be >= 0")


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of: {', '.join(choices)}")
