"""A few-line API for notebooks: load the trained model and its tokenizer, generate, look at attention.

    from attnlab.lab import Lab
    lab = Lab.load(".")                       # models/model.pt + data/tokenizer/tokenizer.model
    print(lab.generate("def forward(self, x):\\n", n_tokens=80))
    att = lab.attention("for i in range(10):\\n    print(i)")
    att.weights[1].shape                      # (H, T, T): layer 1's attention weights
    att.pieces                                # the T tokens, as text
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlab.analysis.capture import capture_attention
from attnlab.analysis.generate import generate
from attnlab.model.scoring import score_windows
from attnlab.data.tokenizer import load_tokenizer
from attnlab.model.checkpoint import load_model
from attnlab.model.transformer import Transformer


@dataclass
class Attention:
    pieces: list[str]  # the T tokens of the text
    weights: dict[int, torch.Tensor]  # layer -> (H, T, T) attention weights (query, key)


@dataclass
class Lab:
    model: Transformer
    processor: object  # sentencepiece.SentencePieceProcessor

    @classmethod
    def load(cls, root: str | Path = ".", device: str = "cpu", model: str = "models/model.pt",
             tokenizer: str = "data/tokenizer") -> "Lab":
        root = Path(root)
        trained, _ = load_model(root / model, device)
        return cls(trained, load_tokenizer(root / tokenizer))

    def encode(self, text: str) -> torch.Tensor:
        """(1, T) token ids on the model's device, cropped to the model's seq_len."""
        ids = self.processor.encode(text)[: self.model.cfg.seq_len]
        return torch.tensor([ids], device=next(self.model.parameters()).device)

    def generate(self, prompt: str, n_tokens: int = 100, temperature: float = 0.8, top_k: int = 50,
                 seed: int = 0) -> str:
        return generate(self.model, self.processor, prompt, n_tokens, temperature, top_k, seed)

    @torch.no_grad()
    def attention(self, text: str) -> Attention:
        idx = self.encode(text)  # (1, T)
        with capture_attention(self.model) as cache:
            self.model(idx)
        pieces = [self.processor.decode([i]) for i in idx[0].tolist()]
        return Attention(pieces, {layer: w[0].cpu() for layer, w in cache.items()})

    @torch.no_grad()
    def loss(self, text: str) -> float:
        """Mean next-token loss of the text in nats/token."""
        ids = self.processor.encode(text)[: self.model.cfg.seq_len + 1]  # one window: T inputs, T targets
        if len(ids) < 2:
            raise ValueError(f"text {text[:40]!r} encodes to {len(ids)} token(s); a loss needs at least 2")
        tokens = np.asarray(ids, dtype=np.int64)
        return score_windows(self.model, tokens, np.array([0]), len(ids) - 1, batch_size=1).loss
