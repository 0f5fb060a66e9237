"""export/lens.py: attnlab models in TransformerLens give attnlab's logits (1e-4) and every layer's attention
pattern (1e-5), on random and on briefly trained weights of each exportable variant; each mapped tensor and each
config choice (exact GELU, attention scale, RoPE base, pairing and width, LayerNorm eps) is shown to matter, so the
comparison can fail; refused variants get one line before any work; the README's lines run as written.

The tests that need TransformerLens (the optional extra `lens`) skip without it, or fail when CI is set: .ci/run
installs the extra.
"""

from __future__ import annotations

import ast
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from builders import PROJECT, stage_env, tiny_model, train_sentencepiece, training_text

from attnlab.analysis.capture import capture_attention
from attnlab.core.errors import AttnlabError, ConfigError
from attnlab.export import lens as lens_module
from attnlab.export.lens import (
    INSTALL_HINT,
    MissingExtra,
    hf_tokenizer,
    lens_config,
    lens_state_dict,
    load_lens,
    read_model,
    save_lens,
    to_lens,
)
from attnlab.model.checkpoint import save_model
from attnlab.model.transformer import Transformer, lm_loss

VOCAB = 61
SEQ_LEN = 24
EXPORTABLE = ["rope", "learned", "none", "sinusoidal"]
LOGITS_ATOL = 1e-4
PATTERN_ATOL = 1e-5


def transformer_lens_or_skip():
    """TransformerLens' native bridge builder; without the lens extra: fail under CI, skip elsewhere."""
    try:
        from transformer_lens.model_bridge.sources.native import boot
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, and the TransformerLens tests cannot run ({exc}): {INSTALL_HINT}")
        pytest.skip(f"TransformerLens tests need the lens extra ({exc}): {INSTALL_HINT}")
    return boot


@pytest.fixture(scope="module")
def boot():
    return transformer_lens_or_skip()


# ------------------------------------------------------------------------------------------------ models


def randomized(model: Transformer, seed: int = 1) -> Transformer:
    """Every parameter drawn at a scale where each piece shows in the output: matrices ~ 1.5 / sqrt(fan-in) (GELU
    inputs of order 1, where exact and tanh GELU differ), biases ~ 0.3, LayerNorm weights ~ 1 + 0.3."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() > 1:
                p.copy_(noise * 1.5 / math.sqrt(p.shape[-1]))
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def trained(model: Transformer, steps: int = 8, seed: int = 2) -> Transformer:
    """A few AdamW steps on random tokens: weights that no initialisation rule produced."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, model.vocab_size, (4, SEQ_LEN + 1), generator=generator)  # (B, T + 1)
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def make_model(pe: str, weights: str = "random", **overrides) -> Transformer:
    model = tiny_model(VOCAB, seed=0, pe=pe, seq_len=SEQ_LEN, dropout=0.1, **overrides)
    return randomized(model) if weights == "random" else trained(model)


def tokens(batch: int = 3, length: int = SEQ_LEN, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def reference(model: Transformer, idx: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """attnlab's logits (the fused SDPA path) and its patterns (capture_attention, the explicit path)."""
    logits = model(idx)
    with capture_attention(model) as patterns:
        model(idx)
    return logits, patterns


@torch.no_grad()
def max_logit_error(bridge, model: Transformer, idx: torch.Tensor) -> float:
    return (bridge(idx) - model(idx)).abs().max().item()


# ------------------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize("pe", EXPORTABLE)
def test_logits_and_every_layers_pattern_match_attnlab(boot, pe, weights):
    model = make_model(pe, weights)
    bridge = to_lens(model)
    for idx in (tokens(), tokens(2, 9)):  # the full length and a shorter one (positions sliced)
        logits, patterns = reference(model, idx)
        with torch.no_grad():
            lens_logits, cache = bridge.run_with_cache(idx)
        torch.testing.assert_close(lens_logits, logits, atol=LOGITS_ATOL, rtol=0)
        for layer in range(model.cfg.n_layers):
            assert cache["pattern", layer].shape == patterns[layer].shape  # (B, H, T, T)
            torch.testing.assert_close(cache["pattern", layer], patterns[layer], atol=PATTERN_ATOL, rtol=0)
    assert logits.abs().max() > 1000 * LOGITS_ATOL  # logits large enough for the tolerance to be a real check


def test_listed_heads_without_non_linear_parts_are_linear_and_export(boot):
    model = make_model("rope", qkv_nonlinear_heads=("all",), qkv_nonlinear_parts=())
    assert max_logit_error(to_lens(model), model, tokens()) < LOGITS_ATOL


@pytest.mark.parametrize("pe", ["rope", "learned"])
@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_every_mapped_tensor_reaches_the_logits(boot, pe):
    """Perturb one tensor of the mapped state dict at a time: the logit comparison fails for each, so the
    matching logits above check every tensor's mapping (embedding scale, tied head, Q/K/V split, biases, norms)."""
    model = make_model(pe)
    fields, state = lens_config(model.cfg, VOCAB), lens_state_dict(model)
    generator = torch.Generator().manual_seed(4)
    unnoticed = []
    bridge = boot({**fields, "device": "cpu"})
    for name, tensor in state.items():
        bridge.load_state_dict({**state, name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator)})
        if max_logit_error(bridge, model, tokens()) < 100 * LOGITS_ATOL:
            unnoticed.append(name)
    assert len(state) == 5 + 16 * model.cfg.n_layers + (pe != "rope")
    # Without RoPE the K bias adds q . b_k to every score of a query alike, which the softmax removes: it cannot
    # show (and need not be right). With RoPE it is turned by the key's position and does show.
    expected = [] if pe == "rope" else [f"blocks.{layer}.attn.k.bias" for layer in range(model.cfg.n_layers)]
    assert unnoticed == expected, "perturbing these tensors leaves the logits within 100x tolerance"


def half_split_layout(weight: torch.Tensor, d_head: int) -> torch.Tensor:
    """Q or K rows (D, ...) per head reordered from adjacent pairs (2i, 2i+1) to the half split (i, i + Dh/2):
    the layout a GPT-NeoX-convention (rotary_adjacent_pairs=False) RoPE would need."""
    order = torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])  # (Dh,)
    heads = weight.unflatten(0, (-1, d_head))  # (H, Dh, ...)
    return heads[:, order].flatten(0, 1)


def test_rope_pairs_are_adjacent_and_the_other_convention_fails(boot):
    """attnlab turns pairs (2i, 2i+1); so does the bridge (rotary_adjacent_pairs=True). Q/K laid out for the
    half-split convention instead give other logits: the comparison tells the two conventions apart."""
    model = make_model("rope")
    fields, state = lens_config(model.cfg, VOCAB), lens_state_dict(model)
    assert fields["rotary_adjacent_pairs"] is True and fields["rotary_dim"] == model.cfg.d_head
    swapped = dict(state)
    for name in state:
        if re.fullmatch(r"blocks\.\d+\.attn\.[qk]\.(weight|bias)", name):
            swapped[name] = half_split_layout(state[name], model.cfg.d_head)
    for layout, expect_match in ((state, True), (swapped, False)):
        bridge = boot({**fields, "device": "cpu"})
        bridge.load_state_dict(layout)
        assert (max_logit_error(bridge, model, tokens()) < LOGITS_ATOL) is expect_match


@pytest.mark.parametrize("change", [
    {"act_fn": "gelu_new"},  # the tanh GELU instead of the exact one
    {"attn_scale": 1.1 * math.sqrt(8)},  # scores / sqrt(Dh) (Dh = 8)
    {"rotary_base": 5000.0},
    {"rotary_dim": 4},  # RoPE on part of each head
    {"eps": 1e-3},  # LayerNorm eps
], ids=lambda change: next(iter(change)))
def test_each_config_choice_shows_in_the_logits(boot, change):
    model = make_model("rope")
    fields, state = lens_config(model.cfg, VOCAB), lens_state_dict(model)
    bridge = boot({**fields, **change, "device": "cpu"})
    bridge.load_state_dict(state)
    assert max_logit_error(bridge, model, tokens()) > 10 * LOGITS_ATOL


# ------------------------------------------------------------------------------------------------ refusals

REFUSED = [
    ({"pe": "complex"}, "model.pe", "complex"),
    ({"pe": "rope_model_dim"}, "model.pe", "rope_model_dim"),
    ({"pe": "alibi"}, "model.pe", "linear bias"),
    ({"qkv_nonlinear_heads": ("all",)}, "model.qkv_nonlinear_heads", "GELU MLP"),
    ({"qkv_nonlinear_heads": ("L1H0",), "qkv_nonlinear_parts": ("v",)}, "model.qkv_nonlinear_heads", "v with"),
    ({"norm": "post"}, "model.norm", "post"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Any work past the check fails the test: importing TransformerLens or transformers, mapping, building."""
    for name in ("transformers", "transformer_lens", "transformer_lens.model_bridge.sources.native"):
        monkeypatch.setitem(sys.modules, name, None)

    def work(*args, **kwargs):
        raise AssertionError("work started before the variant was refused")

    for name in ("lens_config", "lens_state_dict", "model_from_state", "_boot", "hf_tokenizer"):
        monkeypatch.setattr(lens_module, name, work)


@pytest.mark.parametrize("overrides, key, words", REFUSED, ids=[r[1] + "=" + str(r[0]) for r in REFUSED])
def test_a_refused_variant_gets_one_line_before_any_work(tmp_path, no_work, overrides, key, words):
    model = tiny_model(VOCAB, **overrides)
    save_model(tmp_path / "model.pt", model)
    calls = [lambda: to_lens(model), lambda: save_lens(tmp_path / "lens.pt", model),
             lambda: read_model(tmp_path / "model.pt"), lambda: load_lens(tmp_path / "model.pt")]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert info.value.key == key and "\n" not in message and words in message
        assert "cannot be exported to TransformerLens" in message
    assert not (tmp_path / "lens.pt").exists()


@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_the_command_refuses_with_one_line_and_writes_nothing(tmp_path):
    save_model(tmp_path / "model.pt", tiny_model(VOCAB, pe="complex"))
    out = tmp_path / "lens.pt"
    proc = subprocess.run([sys.executable, "-m", "attnlab.export", str(tmp_path / "model.pt"), "--out", str(out)],
                          capture_output=True, text=True, env=stage_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: model.pe: complex cannot be exported to TransformerLens: {lens_module.REFUSED_PE['complex']}"]
    assert not out.exists()


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch):
    for name in ("transformers", "transformer_lens.model_bridge.sources.native"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtra) as info:
        to_lens(tiny_model(VOCAB))
    assert INSTALL_HINT in str(info.value) and "\n" not in str(info.value)
    assert INSTALL_HINT == 'pip install -e ".[lens]"'


@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_importing_the_export_package_imports_no_transformer_lens():
    code = ("import sys, attnlab.export, attnlab.export.lens, attnlab.export.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stage_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- tokenizer, files, README


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece(folder / "tokenizer.model")
    return folder


TRICKY_TEXT = ("class Tabbed:\r\n\tdef f(self, x):\r\n\t\treturn x\t# tab\r\n\n\n  \n"
               "    π = 'naïve café'  # 中文 👋🏽\n\x0c\ntrailing   ")


def test_the_tokenizer_encodes_and_decodes_as_attnlab_does(boot, tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = hf_tokenizer(tokenizer_dir)
    for text in (TRICKY_TEXT, training_text(4000), " leading space", "\n"):
        ids = sp.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == sp.decode(ids) == text
    assert pickle.loads(pickle.dumps(hf))(TRICKY_TEXT, add_special_tokens=False)["input_ids"] == sp.encode(TRICKY_TEXT)
    bridge = to_lens(tiny_model(sp.get_piece_size(), seq_len=SEQ_LEN), tokenizer_dir)
    assert bridge.to_tokens(TRICKY_TEXT[:40])[0].tolist() == sp.encode(TRICKY_TEXT[:40])[:SEQ_LEN]  # no BOS
    assert bridge.to_string(sp.encode(TRICKY_TEXT)) == TRICKY_TEXT


@pytest.mark.e2e  # a subprocess or a long reference run: make test, not test-fast
def test_the_command_writes_a_lens_file_that_opens_with_or_without_attnlab(boot, tokenizer_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    model = trained(tiny_model(sp.get_piece_size(), seed=0, pe="learned", seq_len=SEQ_LEN))
    save_model(tmp_path / "model.pt", model)
    out = tmp_path / "models" / "model_lens.pt"
    proc = subprocess.run([sys.executable, "-m", "attnlab.export", str(tmp_path / "model.pt"), "--tokenizer",
                           str(tokenizer_dir), "--out", str(out)], capture_output=True, text=True, env=stage_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"export: wrote {out}")
    idx = torch.randint(0, sp.get_piece_size(), (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    bridge = load_lens(out)  # its own tokenizer
    assert max_logit_error(bridge, model, idx) < LOGITS_ATOL
    assert bridge.to_tokens("def f(x):")[0].tolist() == sp.encode("def f(x):")
    payload = torch.load(out, weights_only=True)  # TransformerLens alone: boot_native(config), load_state_dict
    alone = boot(payload["config"])
    alone.load_state_dict(payload["state_dict"])
    assert max_logit_error(alone.eval(), model, idx) < LOGITS_ATOL


def test_the_command_writes_nothing_when_the_logits_differ(boot, tmp_path, monkeypatch):
    from attnlab.export import __main__ as command

    save_model(tmp_path / "model.pt", tiny_model(VOCAB))
    monkeypatch.setattr(command, "max_logit_difference", lambda model, bridge: 0.5)
    with pytest.raises(AttnlabError, match="differ .* by 5.00e-01 .*nothing written"):
        command.main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "lens.pt")])
    assert not (tmp_path / "lens.pt").exists()


def readme_lens_lines() -> str:
    """The python block of the README's section "In TransformerLens"."""
    readme = (PROJECT / "README.md").read_text()
    section = readme.split("### In TransformerLens", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_lines_run_as_written(boot, tokenizer_dir, tmp_path, monkeypatch):
    code = readme_lens_lines()
    assert 'load_lens("models/model.pt"' in code and "detect_head(" in code
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    model = trained(tiny_model(sp.get_piece_size(), seed=0, seq_len=64))  # the line is 24 tiny-tokenizer tokens
    save_model(tmp_path / "models" / "model.pt", model)
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    (tmp_path / "data" / "tokenizer" / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    monkeypatch.chdir(tmp_path)
    tree = ast.parse(code)
    *statements, last = tree.body
    namespace: dict = {}
    exec(compile(ast.Module(statements, []), "README.md", "exec"), namespace)
    scores = eval(compile(ast.Expression(last.value), "README.md", "eval"), namespace)
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert torch.all((scores >= 0) & (scores <= 1))  # "mul" scores: the share of attention on the previous token
