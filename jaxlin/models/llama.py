"""Llama-family decoders (Llama, Qwen2, Mistral) in Flax NNX: causal LM, last-token classification, hidden states.

Matches Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` and their
``*ForSequenceClassification`` in eval mode: RMSNorm, rotary positions (θ from ``config.rope_parameters``, or
``rope_theta`` in older configs; rope types "default", "linear" and "llama3"), grouped-query attention, SwiGLU
MLP, q/k/v biases for Qwen2 (and Llama's ``attention_bias``), Mistral/Qwen2 sliding windows, tied or untied
``lm_head``. Rotary positions are ``0 … L-1`` whatever the attention mask says, as transformers 5 computes them
when no ``position_ids`` are passed (``LlamaModel.forward``); with left padding the real tokens therefore sit at
shifted positions, in HF and here alike.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import reject_encoder_head
from .layers import (Embed, Linear, RMSNorm, activation, causal_allowed, check_label_readout, last_real_token,
                     layer_range, masked_softmax_attention, master_dtype, merge_heads, split_heads)

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(config, head_dim: int) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) of the config's rotary embedding, as transformers'
    ``modeling_rope_utils`` computes them. Raises ValueError for rope types jaxlin does not implement."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # configs from before transformers 5
        params = dict(getattr(config, "rope_scaling", None) or {}, rope_theta=getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} in the config's rope_parameters is not supported; jaxlin "
                         f"implements {ROPE_TYPES}. Use a checkpoint with one of those, or add the type to "
                         "jaxlin/models/llama.py:rope_inv_freq")
    inv_freq = 1.0 / (float(params["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_BHLd, cos_Ld, sin_Ld):
    """x·cos + rotate_half(x)·sin, with HF's half-split (not interleaved) layout."""
    half = x_BHLd.shape[-1] // 2
    rotated = jnp.concatenate([-x_BHLd[..., half:], x_BHLd[..., :half]], axis=-1)
    return x_BHLd * cos_Ld.astype(x_BHLd.dtype) + rotated * sin_Ld.astype(x_BHLd.dtype)


class LlamaLayer(nnx.Module):
    def __init__(self, i: int, c, rngs: nnx.Rngs, dtype):
        d, std = c.hidden_size, c.initializer_range
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or d // heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        qkv_bias = c.model_type == "qwen2" or attention_bias
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        hf = f"model.layers.{i}."

        def lin(a, b, path, bias):
            return Linear(a, b, name=f"layer{i}.{path}", hf_name=hf + path, rngs=rngs, use_bias=bias, init_std=std,
                          dtype=dtype)

        self.input_layernorm = RMSNorm(d, eps=c.rms_norm_eps, hf_name=hf + "input_layernorm", dtype=dtype)
        self.q_proj = lin(d, heads * head_dim, "self_attn.q_proj", qkv_bias)
        self.k_proj = lin(d, kv_heads * head_dim, "self_attn.k_proj", qkv_bias)
        self.v_proj = lin(d, kv_heads * head_dim, "self_attn.v_proj", qkv_bias)
        self.o_proj = lin(heads * head_dim, d, "self_attn.o_proj", attention_bias)
        self.post_attention_layernorm = RMSNorm(d, eps=c.rms_norm_eps, hf_name=hf + "post_attention_layernorm",
                                                dtype=dtype)
        self.gate_proj = lin(d, c.intermediate_size, "mlp.gate_proj", mlp_bias)
        self.up_proj = lin(d, c.intermediate_size, "mlp.up_proj", mlp_bias)
        self.down_proj = lin(c.intermediate_size, d, "mlp.down_proj", mlp_bias)
        self.heads, self.kv_heads, self.act = heads, kv_heads, activation(c.hidden_act)
        layer_types = getattr(c, "layer_types", None)
        sliding = layer_types is None or layer_types[i] == "sliding_attention"
        self.window = getattr(c, "sliding_window", None) if sliding else None

    def __call__(self, x_BLD, allowed, cos_Ld, sin_Ld):
        h_BLD = self.input_layernorm(x_BLD)
        q = apply_rope(split_heads(self.q_proj(h_BLD), self.heads), cos_Ld, sin_Ld)
        k = apply_rope(split_heads(self.k_proj(h_BLD), self.kv_heads), cos_Ld, sin_Ld)
        v = split_heads(self.v_proj(h_BLD), self.kv_heads)
        groups = self.heads // self.kv_heads  # HF's repeat_kv: query head h reads kv head h // groups
        k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
        x_BLD = x_BLD + self.o_proj(merge_heads(masked_softmax_attention(q, k, v, allowed[self.window])))
        h_BLD = self.post_attention_layernorm(x_BLD)
        return x_BLD + self.down_proj(self.act(self.gate_proj(h_BLD)) * self.up_proj(h_BLD))


class LlamaDecoder(nnx.Module):
    """``task``: "encoder" → hidden states after the final norm (B, L, D); "causal_lm" → logits (B, L, V), through
    the tied embedding or an untied ``lm_head``, or with ``label_token_ids`` (C,) only those C logits at the last
    real token (B, C), or with ``positions`` (B, K) only the logits at those positions (B, K, V);
    "classification" → ``score`` (no bias) on the last real token, logits (B, C)."""

    def __init__(self, c, *, task: str, num_labels: int | None, rngs: nnx.Rngs, dtype=jnp.float32):
        d, std = c.hidden_size, c.initializer_range
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or d // heads
        kv_heads = c.num_key_value_heads or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
                             "fix the config")
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(c, head_dim))  # static: a constant, not a parameter
        self.embed_tokens = Embed(c.vocab_size, d, hf_name="model.embed_tokens", rngs=rngs, init_std=std,
                                  dtype=dtype)
        self.layers = nnx.List([LlamaLayer(i, c, rngs, dtype) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(d, eps=c.rms_norm_eps, hf_name="model.norm", dtype=dtype)
        self.task = task
        lm_head = score = None
        if task == "causal_lm" and not c.tie_word_embeddings:
            lm_head = Linear(d, c.vocab_size, name="lm_head", hf_name="lm_head", rngs=rngs, use_bias=False,
                             init_std=std, dtype=master_dtype(dtype))
        if task == "classification":
            score = Linear(d, num_labels, name="score", hf_name="score", rngs=rngs, use_bias=False, init_std=std,
                           dtype=master_dtype(dtype))
        self.lm_head, self.score = nnx.data(lm_head), nnx.data(score)

    def __call__(self, input_ids_BL, attention_mask_BL, *, label_token_ids=None, positions=None,
                 start_layer: int = 0, hidden_BLD=None, stop_layer: int | None = None):
        if label_token_ids is not None or positions is not None:
            check_label_readout(self.task, "llama")
        angles_Lh = jnp.arange(input_ids_BL.shape[1], dtype=jnp.float32)[:, None] * jnp.asarray(
            self.inv_freq, jnp.float32)[None, :]
        angles_Ld = jnp.concatenate([angles_Lh, angles_Lh], axis=-1)
        cos_Ld, sin_Ld = jnp.cos(angles_Ld), jnp.sin(angles_Ld)
        allowed = {w: causal_allowed(attention_mask_BL, w) for w in {layer.window for layer in self.layers}}
        x_BLD = self.embed_tokens(input_ids_BL) if hidden_BLD is None else hidden_BLD
        for layer in layer_range(self.layers, start_layer, hidden_BLD, stop_layer):
            x_BLD = layer(x_BLD, allowed, cos_Ld, sin_Ld)
        if stop_layer is not None:
            return x_BLD
        x_BLD = self.norm(x_BLD)
        if label_token_ids is not None:
            last_BD = last_real_token(x_BLD, attention_mask_BL)
            if self.lm_head is None:
                return self.embed_tokens.attend(last_BD, rows=label_token_ids)
            return self.lm_head(last_BD, columns=label_token_ids)
        if positions is not None:
            x_BLD = jnp.take_along_axis(x_BLD, positions[..., None], axis=1)  # (B, K, D): logits below (B, K, V)
        if self.task == "encoder":
            return x_BLD
        if self.task == "causal_lm":
            return self.embed_tokens.attend(x_BLD) if self.lm_head is None else self.lm_head(x_BLD)
        return self.score(last_real_token(x_BLD, attention_mask_BL))


def build(config, *, task: str, num_labels: int | None, head: str | None, rngs: nnx.Rngs,
          dtype) -> LlamaDecoder:
    reject_encoder_head(head)
    return LlamaDecoder(config, task=task, num_labels=num_labels, rngs=rngs, dtype=dtype)


FAMILY = dict(
    name="llama",
    kind="decoder",
    model_types=("llama", "qwen2", "mistral"),
    build=build,
    tasks=("encoder", "causal_lm", "classification"),
    backbone_prefixes=("model.",),
    # rotary buffers of old checkpoints, a tied (or, for other tasks, unused) lm_head, heads of other tasks
    ignorable=(r"\.rotary_emb\.inv_freq$", r"^lm_head\.", r"^score\."),
)
