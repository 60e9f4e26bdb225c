"""Shared fixtures for tests, notebooks and benchmarks: tiny configs of every family with distinct, prime-ish
sizes (so a transposed axis cannot hide), random models built from them, and HF checkpoints written to disk."""
from __future__ import annotations

import jax.numpy as jnp

from . import models


def tiny_config(family: str = "bert", **overrides):
    """A transformers config for a tiny model of ``family``: "bert", "roberta", "gpt2", "llama", "llama-tied",
    "qwen2". Sizes: hidden 36 (bert) / 28–60 (decoders), 4 heads, vocab 97–211, 2–3 layers."""
    import transformers

    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        kw = dict(vocab_size=211, hidden_size=36, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=53, max_position_embeddings=67, type_vocab_size=2, hidden_act="gelu",
                  layer_norm_eps=1e-12, pad_token_id=1 if family == "roberta" else 0,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if family == "roberta":
            kw.update(type_vocab_size=1, bos_token_id=0, eos_token_id=2)
        kw.update(overrides)
        return cls(**kw)
    from .models import _tiny_decoders

    return _tiny_decoders.tiny_decoder_config(family, **overrides)


def tiny_model(family: str = "bert", *, task: str = "encoder", num_labels: int | None = None, seed: int = 0,
               dtype=jnp.float32, **overrides) -> "models.Model":
    """A randomly initialised jaxlin Model of a tiny config (no tokenizer)."""
    config = tiny_config(family, **overrides)
    module = models.build_model(config, task=task, num_labels=num_labels, seed=seed, dtype=dtype)
    name = models.family_for(config)["name"]
    return models.from_nnx(module, config=config, family=name, task=task, source=f"tiny-{family}")


def random_batch(model_or_vocab, batch: int = 5, length: int = 11, *, seed: int = 0, padding_side: str = "right",
                 min_length: int = 3):
    """Token ids and an attention mask with distinct real lengths (padding on ``padding_side``)."""
    import numpy as np

    vocab = model_or_vocab if isinstance(model_or_vocab, int) else model_or_vocab.config.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    lengths = np.linspace(length, min_length, batch).round().astype(int)
    mask = np.zeros((batch, length), np.int32)
    for i, n in enumerate(lengths):
        if padding_side == "right":
            mask[i, :n] = 1
        else:
            mask[i, length - n:] = 1
    pad = 0 if isinstance(model_or_vocab, int) else (getattr(model_or_vocab.config, "pad_token_id", 0) or 0)
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}
