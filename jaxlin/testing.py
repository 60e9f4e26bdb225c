"""Shared fixtures for tests, notebooks and benchmarks: tiny configs of every family with distinct, prime-ish
sizes (so a transposed axis cannot hide), random models built from them, and HF checkpoints written to disk."""
from __future__ import annotations

import jax.numpy as jnp

from . import models


def tiny_config(family: str = "bert", **overrides):
    """A transformers config for a tiny model of ``family``: "bert", "roberta", "gpt2", "llama", "llama_tied",
    "qwen2", "mistral". Sizes: hidden 36 (bert) / 40–56 (decoders; RoPE needs even head dims), 4 heads,
    vocab 97–211, 2–3 layers."""
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
    config = tiny_decoder_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


PAD_ID = 0  # the pad token of every tiny config; tests keep it out of real tokens (HF's classification rule)


def tiny_decoder_config(kind: str):
    """A transformers config for ``kind`` in ("gpt2", "llama", "llama_tied", "qwen2", "mistral")."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "gpt2":
        return GPT2Config(vocab_size=97, n_positions=41, n_embd=36, n_layer=2, n_head=4, n_inner=43,
                          bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID, num_labels=3)
    common = dict(vocab_size=97, hidden_size=44, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=PAD_ID,
                  num_labels=3)
    if kind == "llama":
        return LlamaConfig(**common, head_dim=6, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if kind == "llama_tied":
        return LlamaConfig(**dict(common, hidden_size=40, num_hidden_layers=2), tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**dict(common, hidden_size=56), rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1000.0})
    if kind == "mistral":
        return MistralConfig(**dict(common, hidden_size=48), sliding_window=5)
    raise ValueError(f"unknown tiny decoder {kind!r}; use gpt2, llama, llama_tied, qwen2 or mistral")


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


# ---------------------------------------------------------------------------- toy functions for engine tests

def toy_mlp(params, x):
    """A plain MLP f(params, x) -> (N, 3) for x (N, 5)."""
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def toy_token(params, x):
    """Embedding lookup, masked mean over tokens, dense: f(params, {"input_ids", "attention_mask"}) -> (N, 3)."""
    import jax.numpy as jnp

    h = params["emb"][x["input_ids"]]
    m = x["attention_mask"][..., None].astype(h.dtype)
    h = (h * m).sum(1) / m.sum(1)
    return jnp.tanh(h @ params["w"] + params["b"]) @ params["v"] + params["c"]


def toy_problem(name: str):
    """``(f, params, x1 (7 examples), x2 (5 examples))`` for "mlp" (P = 102) or "token" (P = 161), O = 3."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k = jax.random.split(jax.random.PRNGKey(0), 8)
    if name == "mlp":
        params = {"w1": jax.random.normal(k[0], (5, 11)) / 2.2, "b1": 0.1 * jax.random.normal(k[1], (11,)),
                  "w2": jax.random.normal(k[2], (11, 3)) / 3.3, "b2": 0.1 * jax.random.normal(k[3], (3,))}
        return toy_mlp, params, jax.random.normal(k[4], (7, 5)), jax.random.normal(k[5], (5, 5))

    def inputs(key, n):
        lens = 1 + np.arange(n) % 4
        return {"input_ids": jax.random.randint(key, (n, 4), 0, 13),
                "attention_mask": jnp.asarray((np.arange(4)[None] < lens[:, None]).astype(np.int32))}

    params = {"emb": jax.random.normal(k[0], (13, 6)), "w": jax.random.normal(k[1], (6, 8)) / 2.4,
              "b": 0.1 * jax.random.normal(k[5], (8,)), "v": jax.random.normal(k[2], (8, 3)) / 2.8,
              "c": 0.1 * jax.random.normal(k[3], (3,))}
    return toy_token, params, inputs(k[4], 7), inputs(k[6], 5)
