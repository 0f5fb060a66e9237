"""attnlab's Transformer as a TransformerLens model, so that `run_with_cache`, `cache["pattern", layer]`, hooks and
`transformer_lens.head_detector.detect_head` work on a model the lab trained.

    bridge = to_lens(model)                      # or load_lens("models/model.pt"), load_lens("models/model_lens.pt")
    logits, cache = bridge.run_with_cache(idx)   # logits as model(idx); cache["pattern", layer]: (B, H, T, T)

TransformerLens 4 removed HookedTransformer. Its replacement for a model built from a config is the native
transformer behind `TransformerBridge.boot_native` (pre-norm, split Q/K/V nn.Linear maps, RoPE per head), and that
is what we fill with attnlab's weights. Piece by piece:

- token embedding: attnlab multiplies it by sqrt(D) in forward and ties it to the output head; TransformerLens does
  neither, so embed.weight = sqrt(D) * tok_emb, unembed.weight = tok_emb, unembed.bias = 0.
- positions: rope -> "rotary" over the whole head (rotary_dim = Dh, rotary_base = model.rope_base). attnlab turns
  each adjacent pair (x[2i], x[2i+1]) of a head by t * base^(-2i/Dh); the native model rotates adjacent pairs too
  (rotary_adjacent_pairs=True: the GPT-J/Llama-interleaved convention, not GPT-NeoX's half split). learned ->
  W_pos = pos_emb; sinusoidal -> W_pos = the fixed sin/cos table (a weight there, a buffer here); none -> W_pos = 0.
- attention: the fused qkv rows [0, D), [D, 2D), [2D, 3D) are W_q, W_k, W_v with their biases, each head a block of
  Dh consecutive rows in both; scores / sqrt(Dh), causal mask, softmax; the output projection with its bias.
- MLP: up and down with biases, exact (erf) GELU: act_fn "gelu" ("gelu_new" is the tanh approximation).
- LayerNorm: ln1 and ln2 of each block and the final ln_f, same eps. No dropout: TransformerLens has none.

Refused, before any work, with one line naming the variant: model.pe=complex, rope_model_dim and alibi, non-linear
Q/K/V heads, and model.norm=post (check_exportable says why). Post-norm, checked: the native block is x + f(ln(x)) only.
The one post-norm decoder TransformerLens adapts is Hugging Face's OPT (do_layer_norm_before=False), which does
compute attnlab's post-norm blocks (learned positions only, no RoPE), but TransformerLens 4.3.0's OPT adapter cannot
run it: it expects a final LayerNorm that such an OPT lacks, and under run_with_cache it hands the next layer a
flattened (B*T, D) residual.

Shapes: D d_model, Dh head dimension, V vocabulary, T seq_len.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from attnlab.core.errors import AttnlabError, ConfigError
from attnlab.core.io import atomic_path
from attnlab.core.params import ModelConfig, _build
from attnlab.data.tokenizer import load_tokenizer
from attnlab.model.checkpoint import model_from_state, unwrap
from attnlab.model.transformer import Block, Transformer

LENS_FORMAT = "attnlab-lens/1"  # the `format` entry of a lens file
INSTALL_HINT = 'pip install -e ".[lens]"'

# Why a variant has no TransformerLens form: the second half of its one-line error.
REFUSED_PE = {
    "complex": "its Q and K are complex matrices applied to position-turned token vectors, and TransformerLens' "
    "attention projects with real linear maps",
    "rope_model_dim": "it rotates all d_model dimensions before splitting heads (each head its own frequencies), "
    "and TransformerLens rotates each head with the same frequencies",
    "alibi": "it adds a per-head linear bias to the attention scores, and the native transformer TransformerLens "
    "builds from a config has standard or rotary positions only (its ALiBi attention comes with the BLOOM and MPT "
    "adapters of Hugging Face models)",
}


class MissingExtra(AttnlabError):
    """TransformerLens (or its transformers) is not installed: the message says how to install it."""


# ------------------------------------------------------------------------------------------------ checks


def check_exportable(cfg: ModelConfig) -> None:
    """ConfigError, one line naming the variant and why, for a model TransformerLens cannot express."""
    if cfg.pe in REFUSED_PE:
        raise ConfigError("model.pe", f"{cfg.pe} cannot be exported to TransformerLens: {REFUSED_PE[cfg.pe]}")
    if cfg.qkv_nonlinear_heads and cfg.qkv_nonlinear_parts:
        raise ConfigError(
            "model.qkv_nonlinear_heads",
            f"{list(cfg.qkv_nonlinear_heads)} cannot be exported to TransformerLens: these heads compute "
            f"{'/'.join(cfg.qkv_nonlinear_parts)} with a GELU MLP, and TransformerLens' attention projects linearly",
        )
    if cfg.norm != "pre":
        raise ConfigError(
            "model.norm",
            f"{cfg.norm} cannot be exported to TransformerLens: its native transformer is pre-norm only, "
            "x + f(ln(x)), and a post-norm block ln(x + f(x)) has no form there",
        )


def _import(name: str):
    """Import an optional module of the lens extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingExtra(f"TransformerLens export needs the lens extra ({exc}): {INSTALL_HINT}") from exc


# --------------------------------------------------------------------------------------------- the mapping


def lens_config(cfg: ModelConfig, vocab_size: int, eps: float = 1e-5) -> dict:
    """The TransformerBridgeConfig fields of the native model that computes what attnlab's `cfg` computes.

    Plain values, so that a lens file stores them as they are."""
    check_exportable(cfg)
    fields = {
        "architecture": "TransformerLensNative",
        "model_name": f"attnlab-{cfg.pe}",
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_head": cfg.d_head, "n_layers": cfg.n_layers,
        "d_mlp": cfg.d_ff, "n_ctx": cfg.seq_len, "d_vocab": vocab_size, "d_vocab_out": vocab_size,
        "act_fn": "gelu",  # exact erf GELU, as F.gelu
        "normalization_type": "LN", "eps": eps,
        "use_attn_scale": True, "attn_scale": math.sqrt(cfg.d_head),
        "positional_embedding_type": "rotary" if cfg.pe == "rope" else "standard",
        "default_prepend_bos": False,  # attnlab trains on windows of the token stream: no BOS token
        "init_weights": False,  # every weight comes from attnlab
    }
    if cfg.pe == "rope":
        fields.update(rotary_dim=cfg.d_head, rotary_base=cfg.rope_base, rotary_adjacent_pairs=True)
    return fields


def _position_table(model: Transformer) -> torch.Tensor | None:
    """W_pos (T, D) of an absolute-position variant, None for rope."""
    cfg = model.cfg
    if cfg.pe == "learned":
        return model.pos_emb.weight
    if cfg.pe == "sinusoidal":
        return model.pos_table[: cfg.seq_len]
    if cfg.pe == "none":
        return torch.zeros(cfg.seq_len, cfg.d_model, device=model.tok_emb.weight.device)
    return None


def _block_state(block: Block, prefix: str, d_model: int) -> dict[str, torch.Tensor]:
    attn = block.attn
    weights = attn.qkv.weight.split(d_model)  # 3 x (D, D): rows W_q, W_k, W_v, head h in rows [h Dh, (h+1) Dh)
    biases = attn.qkv.bias.split(d_model)  # 3 x (D,)
    state = {}
    for name, weight, bias in zip("qkv", weights, biases):
        state[f"{prefix}attn.{name}.weight"], state[f"{prefix}attn.{name}.bias"] = weight, bias
    pairs = {"attn.o": attn.out_proj, "ln1": block.ln1, "ln2": block.ln2, "mlp.in": block.mlp.up,
             "mlp.out": block.mlp.down}
    for name, module in pairs.items():
        state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = module.weight, module.bias
    return state


def lens_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """attnlab's weights under the bridge's names, on the CPU (nn.Linear weights are (out, in) in both)."""
    model = unwrap(model)
    check_exportable(model.cfg)
    embedding = model.tok_emb.weight  # (V, D)
    state = {"embed.weight": embedding * math.sqrt(model.cfg.d_model)}  # attnlab scales it in forward
    table = _position_table(model)
    if table is not None:
        state["pos_embed.weight"] = table  # (T, D)
    for layer, block in enumerate(model.blocks):
        state.update(_block_state(block, f"blocks.{layer}.", model.cfg.d_model))
    state["ln_final.weight"], state["ln_final.bias"] = model.ln_f.weight, model.ln_f.bias
    state["unembed.weight"] = embedding  # the tied head: logits = x @ tok_emb^T
    state["unembed.bias"] = torch.zeros(model.vocab_size)
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in state.items()}


# ------------------------------------------------------------------------------------------------ the bridge


def hf_tokenizer(source: str | Path | bytes):
    """attnlab's tokenizer (data/tokenizer, its .model file or bytes) as the Hugging Face tokenizer TransformerLens
    calls: the same pieces, a lossless decode (export/tokenizer.py)."""
    proto = source if isinstance(source, bytes) else load_tokenizer(source).serialized_model_proto()
    return _import("attnlab.export.tokenizer").from_proto(proto)


def _boot(fields: dict, state_dict: dict, tokenizer, device: str | torch.device):
    native = _import("transformer_lens.model_bridge.sources.native")
    hf = hf_tokenizer(tokenizer) if tokenizer is not None else None
    bridge = native.boot({**fields, "device": str(device)}, tokenizer=hf, device=device)
    bridge.load_state_dict(state_dict, strict=True)
    return bridge.eval()


def to_lens(model: torch.nn.Module, tokenizer: str | Path | bytes | None = None,
            device: str | torch.device | None = None):
    """attnlab model -> transformer_lens TransformerBridge (eval mode) with the same logits and attention.

    tokenizer (data/tokenizer, its .model file or bytes) lets the bridge take text (to_tokens, detect_head); device
    defaults to the model's. Refuses a variant TransformerLens cannot express before anything else."""
    model = unwrap(model)
    check_exportable(model.cfg)
    device = device if device is not None else model.tok_emb.weight.device
    fields = lens_config(model.cfg, model.vocab_size, model.blocks[0].ln1.eps)
    return _boot(fields, lens_state_dict(model), tokenizer, device)


# ----------------------------------------------------------------------------------------------- lens files


def save_lens(path: str | Path, model: torch.nn.Module, tokenizer: str | Path | None = None) -> dict:
    """Write the lens file: the bridge's config fields and state dict (+ the tokenizer's bytes), which
    load_lens, or TransformerLens alone (`boot_native(config)`, `load_state_dict`), opens. Returns the payload."""
    model = unwrap(model)
    check_exportable(model.cfg)
    proto = load_tokenizer(tokenizer).serialized_model_proto() if tokenizer is not None else None
    payload = {
        "format": LENS_FORMAT,
        "config": lens_config(model.cfg, model.vocab_size, model.blocks[0].ln1.eps),
        "state_dict": lens_state_dict(model),
        "tokenizer": proto,
        "attnlab": {"model_config": dataclasses.asdict(model.cfg), "vocab_size": model.vocab_size},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return payload


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "model file not found: run the train stage first (dvc repro train)")
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_of(payload: dict) -> Transformer:
    """The model of an attnlab model file's payload, in eval mode, its config checked before it is built."""
    check_exportable(_build(ModelConfig, payload["model_config"], "model."))
    return model_from_state(payload).eval()


def read_model(path: str | Path) -> Transformer:
    """attnlab's model file (models/model.pt) on the CPU; a variant TransformerLens cannot express is refused
    before the model is built."""
    payload = _read(path)
    if "model_config" not in payload:
        raise ConfigError(str(path), "not an attnlab model file (models/model.pt)")
    return _model_of(payload)


def load_lens(path: str | Path, tokenizer: str | Path | bytes | None = None, device: str | torch.device = "cpu"):
    """A TransformerBridge from an attnlab model file (models/model.pt, converted now) or a lens file (save_lens).

    tokenizer: data/tokenizer or its .model file; a lens file's own tokenizer is used when none is given."""
    payload = _read(path)
    if "model_config" in payload:
        return to_lens(_model_of(payload), tokenizer, device)
    if payload.get("format") != LENS_FORMAT:
        raise ConfigError(str(path), f"neither an attnlab model file nor a lens file ({LENS_FORMAT})")
    tokenizer = tokenizer if tokenizer is not None else payload["tokenizer"]
    return _boot(payload["config"], payload["state_dict"], tokenizer, device)


@torch.no_grad()
def max_logit_difference(model: Transformer, bridge, batch_size: int = 4, seed: int = 0) -> float:
    """max |logits of the bridge - attnlab's| on seeded random tokens of the full length: the export's self-check."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.vocab_size, (batch_size, model.cfg.seq_len), generator=generator)  # (B, T)
    device = model.tok_emb.weight.device
    return (bridge(idx.to(device)) - model(idx.to(device))).abs().max().item()
