"""attnlab.generate: the next-token distribution by hand, greedy sampling against a loop with the context cropped
to seq_len, determinism under a seed, and sampling under an intervention."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_model, train_sentencepiece

from attnlab.analysis.capture import explicit_attention
from attnlab.analysis.generate import generate, next_token_distribution, sample_ids
from attnlab.analysis.interventions import TopK, Uniform, intervene
from attnlab.core.errors import ConfigError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def model(sp):
    return tiny_model(vocab_size=sp.get_piece_size(), seq_len=SEQ_LEN)


def test_next_token_distribution_by_hand():
    logits = torch.tensor([1.0, 3.0, -2.0, 0.5, 3.0])
    probs = next_token_distribution(logits, temperature=0.5, top_k=0)
    expected = torch.exp(logits / 0.5) / torch.exp(logits / 0.5).sum()
    torch.testing.assert_close(probs, expected)
    probs = next_token_distribution(logits, temperature=2.0, top_k=3)  # keeps 3.0, 3.0, 1.0
    kept = torch.tensor([True, True, False, False, True])
    expected = torch.where(kept, torch.exp(logits / 2.0), torch.zeros(5))
    torch.testing.assert_close(probs, expected / expected.sum())
    assert torch.equal(next_token_distribution(logits, 1.0, 99), next_token_distribution(logits, 1.0, 0))
    with pytest.raises(ValueError, match="temperature"):
        next_token_distribution(logits, 0.0, 0)


def test_top_1_sampling_is_greedy_with_the_context_cropped(model):
    prompt = [5, 9, 2]
    n_tokens = 2 * SEQ_LEN  # runs past seq_len: the model must only ever see the last seq_len tokens
    new = sample_ids(model, prompt, n_tokens, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(torch.tensor([ids[-SEQ_LEN:]]))[0, -1]  # (V,)
            ids.append(int(logits.argmax()))
    assert new == ids[len(prompt) :]


def test_generate_is_deterministic_under_a_seed_and_keeps_the_prompt(model, sp):
    prompt = "def forward(self, x):\n"
    a = generate(model, sp, prompt, 20, temperature=1.0, top_k=0, seed=7)
    b = generate(model, sp, prompt, 20, temperature=1.0, top_k=0, seed=7)
    assert a == b and a.startswith(prompt) and len(a) > len(prompt)
    others = {generate(model, sp, prompt, 20, temperature=1.0, top_k=0, seed=seed) for seed in range(8, 12)}
    assert len(others | {a}) > 1  # a random-init model spreads its probability: seeds differ


def test_generate_under_an_intervention_uses_the_edited_model(model, sp):
    prompt_ids = sp.encode("import torch\n")
    heads = {(layer, head): Uniform() for layer in range(2) for head in range(4)}
    with explicit_attention(model), intervene(model, heads):
        text = generate(model, sp, "import torch\n", 10, temperature=1.0, top_k=1, seed=0)
        ids = list(prompt_ids)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids[-SEQ_LEN:]]))[0, -1].argmax()))
    assert text == sp.decode(ids)
    with intervene(model, {(0, 0): TopK(1)}):
        generate(model, sp, "x", 3, 1.0, 0, 0)
    assert not model.attention_layers[0].hook_scores.active


def test_an_empty_prompt_names_the_key(model, sp):
    with pytest.raises(ConfigError, match="eval.prompts"):
        generate(model, sp, "", 5, 1.0, 0, 0)
