"""BERT-style encoders (BERT, MiniLM, RoBERTa) with their classification heads, in Flax NNX.

Matches Hugging Face ``BertModel``/``RobertaModel`` in eval mode (no dropout): post-LayerNorm blocks, exact
(erf) GELU, absolute positions (RoBERTa: counted from ``pad_token_id + 1`` over non-pad tokens, as HF does).
Heads on the first token: ``"roberta"`` = dense + tanh + out_proj (``RobertaClassificationHead``),
``"bert"`` = pooler (dense + tanh) + linear ``classifier`` (``BertForSequenceClassification``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import (Embed, LayerNorm, Linear, activation, check_label_readout, layer_range, masked_softmax_attention,
                     master_dtype, merge_heads, split_heads)

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")


class BertLayer(nnx.Module):
    def __init__(self, i: int, c, prefix: str, rngs: nnx.Rngs, dtype):
        d, f, std, eps = c.hidden_size, c.intermediate_size, c.initializer_range, c.layer_norm_eps
        hf = f"{prefix}encoder.layer.{i}."

        def lin(a, b, name, hf_name):
            return Linear(a, b, name=f"layer{i}.{name}", hf_name=hf + hf_name, rngs=rngs, init_std=std, dtype=dtype)

        self.query = lin(d, d, "attention.query", "attention.self.query")
        self.key = lin(d, d, "attention.key", "attention.self.key")
        self.value = lin(d, d, "attention.value", "attention.self.value")
        self.attn_out = lin(d, d, "attention.output.dense", "attention.output.dense")
        self.attn_norm = LayerNorm(d, eps=eps, hf_name=hf + "attention.output.LayerNorm", dtype=dtype)
        self.intermediate = lin(d, f, "intermediate.dense", "intermediate.dense")
        self.output = lin(f, d, "output.dense", "output.dense")
        self.out_norm = LayerNorm(d, eps=eps, hf_name=hf + "output.LayerNorm", dtype=dtype)
        self.num_heads, self.act = c.num_attention_heads, activation(c.hidden_act)

    def __call__(self, x_BLD, allowed_B11L):
        q, k, v = (split_heads(m(x_BLD), self.num_heads) for m in (self.query, self.key, self.value))
        attn_BLD = merge_heads(masked_softmax_attention(q, k, v, allowed_B11L))
        x_BLD = self.attn_norm(x_BLD + self.attn_out(attn_BLD))
        return self.out_norm(x_BLD + self.output(self.act(self.intermediate(x_BLD))))


class BertEncoder(nnx.Module):
    """``task``: "encoder" → last hidden states (B, L, D); "classification" → logits (B, C)."""

    def __init__(self, c, *, task: str, num_labels: int | None, head: str, rngs: nnx.Rngs, dtype=jnp.float32):
        self.roberta = c.model_type in ROBERTA_TYPES
        prefix = "roberta." if self.roberta else "bert."
        d, std = c.hidden_size, c.initializer_range
        self.word = Embed(c.vocab_size, d, hf_name=prefix + "embeddings.word_embeddings", rngs=rngs, init_std=std,
                          dtype=dtype)
        self.position = Embed(c.max_position_embeddings, d, hf_name=prefix + "embeddings.position_embeddings",
                              rngs=rngs, init_std=std, dtype=dtype)
        self.token_type = Embed(c.type_vocab_size, d, hf_name=prefix + "embeddings.token_type_embeddings",
                                rngs=rngs, init_std=std, dtype=dtype)
        self.emb_norm = LayerNorm(d, eps=c.layer_norm_eps, hf_name=prefix + "embeddings.LayerNorm", dtype=dtype)
        self.layers = nnx.List([BertLayer(i, c, prefix, rngs, dtype) for i in range(c.num_hidden_layers)])
        self.task, self.head, self.pad_id = task, head, c.pad_token_id
        pooler = head_dense = classifier = None
        if task == "classification":
            def lin(a, b, name, hf_name):  # the head (pooler included) in float32 at least: see master_dtype
                return Linear(a, b, name=name, hf_name=hf_name, rngs=rngs, init_std=std,
                              dtype=master_dtype(dtype))

            if head == "bert":
                pooler = lin(d, d, "pooler.dense", prefix + "pooler.dense")
                classifier = lin(d, num_labels, "classifier", "classifier")
            else:
                head_dense = lin(d, d, "classifier.dense", "classifier.dense")
                classifier = lin(d, num_labels, "classifier.out_proj", "classifier.out_proj")
        self.pooler, self.head_dense, self.classifier = nnx.data(pooler), nnx.data(head_dense), nnx.data(classifier)

    def positions(self, input_ids_BL):
        length = input_ids_BL.shape[1]
        if not self.roberta:
            return jnp.broadcast_to(jnp.arange(length), input_ids_BL.shape)
        not_pad = (input_ids_BL != self.pad_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_id

    def __call__(self, input_ids_BL, attention_mask_BL, token_type_ids_BL=None, *, label_token_ids=None,
                 start_layer: int = 0, hidden_BLD=None, stop_layer: int | None = None):
        if label_token_ids is not None:
            check_label_readout(self.task, "bert")
        if hidden_BLD is None:
            if token_type_ids_BL is None:
                token_type_ids_BL = jnp.zeros_like(input_ids_BL)
            x = self.word(input_ids_BL) + self.position(self.positions(input_ids_BL)) + \
                self.token_type(token_type_ids_BL)
            x = self.emb_norm(x)
        else:
            x = hidden_BLD
        allowed = attention_mask_BL.astype(bool)[:, None, None, :]
        for layer in layer_range(self.layers, start_layer, hidden_BLD, stop_layer):
            x = layer(x, allowed)
        if stop_layer is not None:
            return x
        if self.task == "encoder":
            return x
        first_BD = x[:, 0]
        if self.head == "bert":
            return self.classifier(jnp.tanh(self.pooler(first_BD)))
        return self.classifier(jnp.tanh(self.head_dense(first_BD)))


HEADS = ("roberta", "bert")  # "roberta": dense + tanh + out_proj (the paper's); "bert": pooler + linear


def build(config, *, task: str, num_labels: int | None, head: str | None, rngs: nnx.Rngs, dtype) -> BertEncoder:
    if task not in ("encoder", "classification"):
        raise ValueError(f"task={task!r} is not available for the encoder family {config.model_type!r}; "
                         "use task='encoder' or task='classification'")
    if head is None:
        head = "roberta" if config.model_type in ROBERTA_TYPES else "bert"
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not a BERT-style head; use one of {HEADS}")
    return BertEncoder(config, task=task, num_labels=num_labels, head=head, rngs=rngs, dtype=dtype)


FAMILY = dict(
    name="bert",
    kind="encoder",
    model_types=("bert",) + ROBERTA_TYPES,
    build=build,
    tasks=("encoder", "classification"),
    # checkpoint prefixes a bare backbone may have been saved without, and tensors other tasks leave behind
    backbone_prefixes=("bert.", "roberta."),
    # learned positions: BERT 0 … L-1; RoBERTa pad_token_id+1 … pad_token_id+L (see BertEncoder.positions)
    max_length=lambda c: c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type in ROBERTA_TYPES else 0),
    ignorable=(r"(^|\.)position_ids$", r"(^|\.)pooler\.", r"^cls\.", r"^lm_head\.", r"^classifier\."),
)
