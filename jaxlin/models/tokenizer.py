"""Text → token ids, through a Hugging Face tokenizer (transformers' tokenizers; no torch needed)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data import DataError, pad_batch


class Tokenizer:
    """Implements ``jaxlin.data.TokenizerLike``; calling it returns padded numpy arrays.

    >>> batch = model.tokenizer(["a text", "another"], max_length=128)
    >>> batch["input_ids"].shape, batch["attention_mask"].dtype  # (2, 8), int32
    """

    def __init__(self, hf_tokenizer, *, pad_token_id: int | None = None, padding_side: str = "right"):
        self.hf = hf_tokenizer
        pad = hf_tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:  # decoders often have no pad token; padded positions are masked anyway
            pad = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)
        self.padding_side = padding_side

    def encode_unpadded(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            raise DataError("no texts to tokenize (got an empty list); pass at least one text")
        if int(max_length) < 1:
            raise DataError(f"max_length={max_length} leaves no room for a token; pass max_length ≥ 1 (e.g. 128)")
        return self.hf(texts, truncation=True, max_length=int(max_length))["input_ids"]

    def __call__(self, texts: Sequence[str], *, max_length: int = 128, pad_to_multiple_of: int = 8,
                 padding_side: str | None = None) -> dict[str, np.ndarray]:
        ids = self.encode_unpadded(texts, max_length)
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise DataError(f"text {empty[0]} ({list(texts)[empty[0]][:40]!r}) has no tokens, so its row would be all "
                            f"padding ({len(empty)} such text(s)); drop or fill empty texts")
        return pad_batch(ids, pad_token_id=self.pad_token_id,
                         pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side or self.padding_side)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])
