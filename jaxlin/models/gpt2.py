"""GPT-2 decoders in Flax NNX: causal LM (tied ``lm_head``), last-token classification, and bare hidden states.

Matches Hugging Face ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification`` in eval mode: learned absolute
positions, pre-LayerNorm blocks, fused ``c_attn`` (q, k, v), Conv1D weights stored (d_in, d_out)
(``hf_transpose=False``). Positions are ``0 … L-1`` whatever the attention mask says, as transformers 5 computes
them when no ``position_ids`` are passed (``GPT2Model.forward``); with left padding the real tokens therefore sit
at shifted positions, in HF and here alike.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .base import reject_encoder_head
from .layers import (Embed, LayerNorm, Linear, activation, causal_allowed, check_label_readout, last_real_token,
                     layer_range, masked_softmax_attention, master_dtype, merge_heads, split_heads)


class GPT2Block(nnx.Module):
    def __init__(self, i: int, c, rngs: nnx.Rngs, dtype):
        d, eps, std = c.n_embd, c.layer_norm_epsilon, c.initializer_range
        hf = f"transformer.h.{i}."

        def conv(a, b, path):
            return Linear(a, b, name=f"layer{i}.{path}", hf_name=hf + path, rngs=rngs, hf_transpose=False,
                          init_std=std, dtype=dtype)

        self.ln_1 = LayerNorm(d, eps=eps, hf_name=hf + "ln_1", dtype=dtype)
        self.c_attn = conv(d, 3 * d, "attn.c_attn")
        self.attn_proj = conv(d, d, "attn.c_proj")
        self.ln_2 = LayerNorm(d, eps=eps, hf_name=hf + "ln_2", dtype=dtype)
        self.c_fc = conv(d, c.n_inner or 4 * d, "mlp.c_fc")
        self.mlp_proj = conv(c.n_inner or 4 * d, d, "mlp.c_proj")
        self.num_heads, self.act = c.n_head, activation(c.activation_function)
        # masked_softmax_attention divides scores by √head_dim (HF's scale_attn_weights=True); HF's other
        # scalings are applied to q
        self.q_factor = 1.0 if c.scale_attn_weights else (d // c.n_head) ** 0.5
        if c.scale_attn_by_inverse_layer_idx:
            self.q_factor /= float(i + 1)

    def __call__(self, x_BLD, allowed_B1LL):
        q_BLD, k_BLD, v_BLD = jnp.split(self.c_attn(self.ln_1(x_BLD)), 3, axis=-1)
        if self.q_factor != 1.0:
            q_BLD = q_BLD * self.q_factor
        q, k, v = (split_heads(t, self.num_heads) for t in (q_BLD, k_BLD, v_BLD))
        x_BLD = x_BLD + self.attn_proj(merge_heads(masked_softmax_attention(q, k, v, allowed_B1LL)))
        return x_BLD + self.mlp_proj(self.act(self.c_fc(self.ln_2(x_BLD))))


class GPT2Decoder(nnx.Module):
    """``task``: "encoder" → hidden states after ``ln_f`` (B, L, D); "causal_lm" → logits (B, L, V) through the
    tied embedding, or with ``label_token_ids`` (C,) only those C logits at the last real token (B, C), or with
    ``positions`` (B, K) only the logits at those positions (B, K, V);
    "classification" → ``score`` (no bias) on the last real token, logits (B, C)."""

    def __init__(self, c, *, task: str, num_labels: int | None, rngs: nnx.Rngs, dtype=jnp.float32):
        if getattr(c, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention=True (an encoder-decoder half) is not supported; "
                             "load a decoder-only GPT-2 checkpoint")
        d, std = c.n_embd, c.initializer_range
        self.wte = Embed(c.vocab_size, d, hf_name="transformer.wte", rngs=rngs, init_std=std, dtype=dtype)
        self.wpe = Embed(c.n_positions, d, hf_name="transformer.wpe", rngs=rngs, init_std=std, dtype=dtype)
        self.layers = nnx.List([GPT2Block(i, c, rngs, dtype) for i in range(c.n_layer)])
        self.ln_f = LayerNorm(d, eps=c.layer_norm_epsilon, hf_name="transformer.ln_f", dtype=dtype)
        self.task = task
        score = None
        if task == "classification":
            score = Linear(d, num_labels, name="score", hf_name="score", rngs=rngs, use_bias=False, init_std=std,
                           dtype=master_dtype(dtype))
        self.score = nnx.data(score)

    def __call__(self, input_ids_BL, attention_mask_BL, *, label_token_ids=None, positions=None,
                 start_layer: int = 0, hidden_BLD=None, stop_layer: int | None = None):
        if label_token_ids is not None or positions is not None:
            check_label_readout(self.task, "gpt2")
        if hidden_BLD is None:
            x_BLD = self.wte(input_ids_BL) + self.wpe(jnp.arange(input_ids_BL.shape[1]))[None]
        else:
            x_BLD = hidden_BLD
        allowed_B1LL = causal_allowed(attention_mask_BL)
        for layer in layer_range(self.layers, start_layer, hidden_BLD, stop_layer):
            x_BLD = layer(x_BLD, allowed_B1LL)
        if stop_layer is not None:
            return x_BLD
        x_BLD = self.ln_f(x_BLD)
        if label_token_ids is not None:
            return self.wte.attend(last_real_token(x_BLD, attention_mask_BL), rows=label_token_ids)
        if positions is not None:
            return self.wte.attend(jnp.take_along_axis(x_BLD, positions[..., None], axis=1))  # (B, K, V)
        if self.task == "encoder":
            return x_BLD
        if self.task == "causal_lm":
            return self.wte.attend(x_BLD)
        return self.score(last_real_token(x_BLD, attention_mask_BL))


def build(config, *, task: str, num_labels: int | None, head: str | None, rngs: nnx.Rngs, dtype) -> GPT2Decoder:
    reject_encoder_head(head)
    return GPT2Decoder(config, task=task, num_labels=num_labels, rngs=rngs, dtype=dtype)


FAMILY = dict(
    name="gpt2",
    kind="decoder",
    model_types=("gpt2",),
    build=build,
    tasks=("encoder", "causal_lm", "classification"),
    backbone_prefixes=("transformer.",),
    max_length=lambda c: c.n_positions,  # learned positions 0 … n_positions-1
    # causal-mask buffers of old checkpoints, the tied lm_head, and heads other tasks leave behind
    ignorable=(r"\.attn\.(masked_)?bias$", r"^lm_head\.", r"^score\."),
)
