"""The explorer's data and page without a browser: the weights are the model's attention on attention_stats'
examples (same windows, cropped), the compact format round-trips, the page is self-contained and escaped.
The browser half is tests/e2e/test_explorer_browser.py."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from builders import tiny_model, train_sentencepiece, write_params

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.explorer import example_attention, explorer_data, load_examples
from attnlab.analysis.stats import row_stats
from attnlab.core.errors import ConfigError
from attnlab.core.params import load_params
from attnlab.model.checkpoint import save_model
from attnlab.report.explorer import (
    WEIGHT_DTYPE,
    explorer_html,
    explorer_size_bytes,
    lower_triangle,
    pack_weights,
    script_json,
)

SEQ_LEN, N_EXAMPLES = 24, 3


def unpack_weights(text: str, n_layers: int, n_heads: int, n_tokens: int) -> np.ndarray:
    """pack_weights undone, as the page's script reads it: (L, H, n, n) float32, zero above the diagonal."""
    tri = np.frombuffer(base64.b64decode(text), dtype=WEIGHT_DTYPE).astype(np.float32)
    out = np.zeros((n_layers, n_heads, n_tokens, n_tokens), dtype=np.float32)
    rows, cols = np.tril_indices(n_tokens)
    out[..., rows, cols] = tri.reshape(n_layers, n_heads, -1)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model file, a tokenizer, and examples.npz as attention_stats writes it (val windows differ)."""
    root = tmp_path_factory.mktemp("explorer")
    sp = train_sentencepiece(root / "tokenizer" / "tokenizer.model")
    model = tiny_model(vocab_size=sp.get_piece_size(), seq_len=SEQ_LEN)
    save_model(root / "model.pt", model)
    ids = np.asarray(sp.encode("def f(a, b):\n    return a < b and '</script>' & b\n" * 30), dtype=np.uint16)
    starts = np.array([[0, 7, 19], [3, 11, 30]])
    tokens = np.stack([np.stack([ids[s : s + SEQ_LEN] for s in split]) for split in starts])  # (2, N, T)
    (root / "attention").mkdir()
    np.savez(root / "attention" / "examples.npz", splits=np.array(["train", "val"]), starts=starts, tokens=tokens)
    return root, sp, model, tokens


def params(root, **explorer):
    return load_params(write_params(root / "params.yaml", {"explorer": explorer, "train": {"device": "cpu"}}))


def test_examples_are_the_val_windows_of_attention_stats_in_order(run):
    root, _, _, tokens = run
    starts, got = load_examples(root / "attention", 2)
    np.testing.assert_array_equal(starts, [3, 11])
    np.testing.assert_array_equal(got, tokens[1, :2])
    with pytest.raises(ConfigError, match="explorer.n_examples: 4, but .* holds 3 examples"):
        load_examples(root / "attention", 4)


def test_weights_are_the_models_rows_cropped_and_their_stats_match(run):
    root, _, model, tokens = run
    data = explorer_data(params(root, n_examples=2, max_tokens=20), root / "model.pt", root / "attention")
    assert data.examples == [0, 1] and data.split == "val" and data.seq_len == SEQ_LEN
    assert data.weights.shape == (2, 2, 4, 20, 20) and data.tokens.shape == (2, 20)
    with torch.no_grad(), capture_attention(model) as cache:
        model(torch.from_numpy(tokens[1, :2].astype(np.int64)))  # the whole windows, as attention_stats runs them
        full = torch.stack([cache[layer] for layer in range(2)], 1)  # (N, L, H, T, T)
    np.testing.assert_allclose(data.weights, full[..., :20, :20].numpy(), atol=1e-6)
    want = row_stats(full)["entropy_bits"][..., :20].numpy()
    got = row_stats(torch.from_numpy(data.weights))["entropy_bits"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_short_model_shows_its_whole_window(run):
    _, _, model, tokens = run
    weights = example_attention(model, torch.from_numpy(tokens[1].astype(np.int64)), SEQ_LEN)
    assert weights.shape == (N_EXAMPLES, 2, 4, SEQ_LEN, SEQ_LEN)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_float16_lower_triangles_round_trip_within_what_the_page_needs():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 40, 40)) * 3
    scores[..., np.triu_indices(40, 1)[0], np.triu_indices(40, 1)[1]] = -np.inf
    weights = torch.softmax(torch.from_numpy(scores), -1).numpy().astype(np.float32)
    tri = lower_triangle(weights)
    assert tri.shape == (2, 3, 40 * 41 // 2)
    assert tri[0, 0, 3 * 4 // 2 + 2] == weights[0, 0, 3, 2]  # row t starts at t(t+1)/2
    back = unpack_weights(pack_weights(weights), 2, 3, 40)
    np.testing.assert_allclose(back, weights, atol=5e-4, rtol=1e-3)
    np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-3)
    bits = row_stats(torch.from_numpy(back / back.sum(-1, keepdims=True)))["entropy_bits"]
    np.testing.assert_allclose(bits, row_stats(torch.from_numpy(weights))["entropy_bits"], atol=0.01)
    assert len(pack_weights(weights)) == explorer_size_bytes(1, 2, 3, 40)


def page_payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.DOTALL)
    assert match, "the data script"
    return json.loads(match.group(1))


def test_the_page_is_self_contained_escaped_and_carries_the_controls(run):
    root, sp, _, tokens = run
    data = explorer_data(params(root, n_examples=3, max_tokens=20), root / "model.pt", root / "attention")
    page = explorer_html(data, sp)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page and " src=" not in page
    assert page.count("</script>") == 2  # the data and the script; the source's '</script>' is escaped
    for select, values in (("example", range(3)), ("layer", range(2)), ("head", range(4))):
        block = page[page.index(f'<select id="{select}">') :]
        block = block[: block.index("</select>")]
        assert re.findall(r'<option value="(\d+)"', block) == [str(v) for v in values], select
    payload = page_payload(page)
    assert (payload["n_layers"], payload["n_heads"], payload["n_tokens"], payload["seq_len"]) == (2, 4, 20, SEQ_LEN)
    assert [e["example"] for e in payload["examples"]] == [0, 1, 2]
    assert [e["start"] for e in payload["examples"]] == [3, 11, 30]
    first = payload["examples"][0]
    assert "".join(first["pieces"]) == sp.decode(tokens[1, 0, :20].tolist())  # lossless on this text
    np.testing.assert_allclose(unpack_weights(first["weights"], 2, 4, 20), data.weights[0], atol=5e-4, rtol=1e-3)


def test_script_json_cannot_close_its_element():
    text = script_json({"piece": "</script><!-- & >"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"piece": "</script><!-- & >"}


def test_a_tokenizer_from_another_run_is_refused(run):
    root, _, _, _ = run
    data = explorer_data(params(root, n_examples=1, max_tokens=20), root / "model.pt", root / "attention")

    class Smaller:  # a tokenizer whose vocabulary ends below the examples' largest id
        def get_piece_size(self):
            return int(data.tokens.max())

    with pytest.raises(ConfigError, match=f"--tokenizer: has {int(data.tokens.max())} pieces"):
        explorer_html(data, Smaller())


def test_the_head_grid_carries_each_heads_role_scores(run):
    from attnlab.core.errors import ConfigError
    from attnlab.report.explorer import role_labels

    root, sp, _, _ = run
    data = explorer_data(params(root, n_examples=1, max_tokens=20), root / "model.pt", root / "attention")
    heads = {f"L{layer}H{head}": {"induction": 0.02, "duplicate": 0.01, "previous_token": 0.05, "sink": 0.1}
             for layer in range(2) for head in range(4)}
    heads["L1H2"].update(induction=0.62, sink=0.45)
    heads["L0H3"]["previous_token"] = 0.91
    page = explorer_html(data, sp, {"heads": heads})
    roles = page_payload(page)["roles"]
    assert roles["L1H2"] == {"title": "induction 0.62, duplicate 0.01, previous token 0.05, sink 0.45",
                             "tag": "ind sink"}
    assert roles["L0H3"]["tag"] == "prev" and roles["L0H0"]["tag"] == ""
    assert "tagged with its head's roles" in page and "td.dataset.tag" in page
    assert page_payload(explorer_html(data, sp))["roles"] == {}  # without head_roles.json: no labels
    assert "tagged with its head's roles" not in explorer_html(data, sp)
    del heads["L1H3"]
    with pytest.raises(ConfigError, match="rerun head_roles"):
        role_labels({"heads": heads}, 2, 4)
