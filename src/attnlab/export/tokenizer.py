"""attnlab's SentencePiece tokenizer as the Hugging Face tokenizer that TransformerLens' to_tokens, to_string and
detect_head call. Imports transformers (the lens extra): lens.py imports this module only when a model gets a
tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import SentencePieceBackend

from attnlab.data.tokenizer import MODEL_FILE


class AttnlabTokenizer(SentencePieceBackend):
    """transformers' SentencePieceBackend over attnlab's model (legacy=True: text goes to SentencePiece as it is),
    so text encodes piece for piece as attnlab encodes it; decoding is SentencePiece's own, lossless on code (the
    base class strips the text and leaves byte-fallback pieces undecoded)."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))


def from_proto(proto: bytes) -> AttnlabTokenizer:
    """The tokenizer of a serialized SentencePiece model (tokenizer.model's bytes); no BOS, as attnlab trains."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    with tempfile.TemporaryDirectory() as tmp:  # SentencePieceBackend reads a file, once
        path = Path(tmp) / MODEL_FILE
        path.write_bytes(proto)
        return AttnlabTokenizer(vocab_file=str(path), legacy=True, clean_up_tokenization_spaces=False,
                                unk_token=sp.id_to_piece(sp.unk_id()), eos_token=sp.id_to_piece(sp.eos_id()))
