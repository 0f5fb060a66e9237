"""Sampling text from the model: seeded, with temperature and top-k, the context cropped to model.seq_len.

    text = generate(model, sp, "def forward(self, x):\n", n_tokens=80, temperature=0.8, top_k=50, seed=1337)

Runs whatever hooks are on the model, so it samples under an intervention when called inside
``attnlab.interventions.intervene``. No KV cache: each new token is one forward pass over the last
seq_len tokens, which keeps the code obviously equal to the model's forward.
"""

from __future__ import annotations

import torch

from attnlab.core.errors import ConfigError
from attnlab.model.transformer import Transformer


def next_token_distribution(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Probabilities of the next token from the last logits (V,): softmax(logits / temperature) over the top_k
    largest logits (ties with the k-th are kept; top_k = 0 or >= V keeps them all). Returns (V,) float32."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature  # (V,)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]  # the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)  # (V,)


@torch.no_grad()
def sample_ids(
    model: Transformer,
    prompt_ids: list[int],
    n_tokens: int,
    temperature: float,
    top_k: int,
    generator: torch.Generator,
    stop_id: int | None = None,
) -> list[int]:
    """n_tokens new ids after prompt_ids (fewer if stop_id is sampled; it is included)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the model needs at least one token to condition on")
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (P,)
    new: list[int] = []
    for _ in range(n_tokens):
        context = ids[-seq_len:]  # (<= seq_len,) the window the model can see
        logits = model(context[None])[0, -1]  # (V,) logits of the next token
        probs = next_token_distribution(logits, temperature, top_k)  # (V,)
        token = torch.multinomial(probs, 1, generator=generator)  # (1,)
        ids = torch.cat([ids, token])
        new.append(int(token))
        if stop_id is not None and new[-1] == stop_id:
            break
    return new


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The sampling seed of prompt number `prompt_index`: evaluate's samples and the interventions' samples
    use the same one, so the interventions' baseline text is evaluate's sample for that prompt."""
    return seed + prompt_index


def generate(
    model: Transformer,
    tokenizer_processor,
    prompt: str,
    n_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    stop_at_eos: bool = False,
) -> str:
    """The prompt and n_tokens sampled tokens, decoded. tokenizer_processor: a SentencePieceProcessor.

    Sampling draws from a torch.Generator seeded with `seed`, so the same model, prompt and seed give the
    same text; the context is cropped to the model's seq_len.
    """
    prompt_ids = list(tokenizer_processor.encode(prompt))
    if not prompt_ids:
        raise ConfigError("eval.prompts", f"{prompt!r} encodes to no tokens; use a non-empty prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer_processor.eos_id()
    stop_id = eos if stop_at_eos and eos >= 0 else None
    new = sample_ids(model, prompt_ids, n_tokens, temperature, top_k, generator, stop_id)
    return tokenizer_processor.decode(prompt_ids + new)
