"""Sampling text from a trained model (no KV cache: the models are small and samples short)."""

from __future__ import annotations

import torch

from attnlab.model import Transformer


@torch.no_grad()
def generate_ids(
    model: Transformer, prompt_ids: list[int], n_tokens: int, temperature: float = 1.0, top_k: int = 0,
    seed: int = 0, stop_id: int | None = None,
) -> list[int]:
    """Append n_tokens sampled ids to prompt_ids; the context is cropped to the model's seq_len."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids) or [stop_id if stop_id is not None else 0]
    model.eval()
    for _ in range(n_tokens):
        context = torch.tensor([ids[-model.cfg.seq_len :]], device=device)  # (1, T)
        logits = model(context)[0, -1].float().cpu()  # (V,)
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if stop_id is not None and next_id == stop_id:
            break
        ids.append(next_id)
    return ids


def generate(
    model: Transformer, processor, prompt: str, n_tokens: int, temperature: float = 1.0, top_k: int = 0,
    seed: int = 0,
) -> str:
    """Prompt text in, prompt + continuation text out. processor: a sentencepiece.SentencePieceProcessor."""
    ids = generate_ids(model, processor.encode(prompt), n_tokens, temperature, top_k, seed, processor.eos_id())
    return processor.decode(ids)
