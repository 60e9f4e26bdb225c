"""Flax NNX building blocks shared by every family.

Every parameterised block carries two names:

- ``name``: jaxlin's module name (``layer3.attention.query``), used by adapters and per-module kernels;
- ``hf_name``: the Hugging Face module path in the task model (``bert.encoder.layer.3.attention.self.query``),
  used by the checkpoint loader and the peft exporter.

A ``Linear`` given LoRA factors (:meth:`Linear.add_lora`, by ``jaxlin.adapters.adapt``) computes
``x @ kernel + bias + scale·(x @ lora_a) @ lora_b`` without forming the merged weight; the factors are
parameters of the module like its kernel, the scale a static attribute.

Mixed precision (docs/scaling.md, "Mixed precision"): a block built with a half-precision ``dtype`` (bfloat16)
stores its weights in it and computes in it; a ``Linear`` casts its input, weights and LoRA factors (float32
master copies) to that dtype, its one place of casting. Heads are built in `master_dtype` (float32 at least), so
logits leave the model in float32; norms' statistics and attention's softmax are taken in float32 at least.
Float32 and float64 modules cast nothing (x64 references keep their precision).

``Linear`` also reports to an active :func:`tapping` context, which is how jaxlin reads module inputs
``h_t`` and output cotangents ``g_t`` (through zero probes added to module outputs) for structured kernels,
without per-parameter Jacobians. Outside that context it is a plain dense layer.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

_CREATION = itertools.count()  # orders modules as their families define them
_TAPS: contextvars.ContextVar["_TapState | None"] = contextvars.ContextVar("jaxlin_taps", default=None)


@dataclasses.dataclass
class _TapState:
    probes: dict  # module name -> array added to the module output (zeros; differentiate w.r.t. it)
    capture: frozenset  # module names whose inputs are recorded
    inputs: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def tapping(probes: dict, capture) -> Iterator[_TapState]:
    """Within this context, every ``Linear`` named in ``capture`` records its input (and output), and
    every ``Linear`` named in ``probes`` adds ``probes[name]`` to its output. Used at trace time only."""
    state = _TapState(dict(probes), frozenset(capture))
    token = _TAPS.set(state)
    try:
        yield state
    finally:
        _TAPS.reset(token)


def _tap(name: str, x: jax.Array, y: jax.Array, columns=None) -> jax.Array:
    """``columns``: ``y`` holds only these output columns of the module (a label-word readout of an LM head); the
    probe, shaped like the full output, is read at them."""
    state = _TAPS.get()
    if state is None:
        return y
    if name in state.capture:
        state.inputs[name] = x
        state.outputs[name] = y
    probe = state.probes.get(name)
    if probe is None:
        return y
    return y + (probe if columns is None else probe[..., columns]).astype(y.dtype)


def is_half(dtype) -> bool:
    """Whether ``dtype`` is a half-precision float (bfloat16, float16): the dtypes a module computes in as such."""
    return jnp.finfo(dtype).bits < 32


def master_dtype(dtype):
    """``dtype`` promoted to float32 at least (float64 stays): what a half-precision model keeps its trained leaves
    in (heads, LoRA factors: float32 master copies, `jaxlin.adapt`) and returns logits in, and the dtype its
    statistics and kernel contractions are taken in."""
    return jnp.promote_types(dtype, jnp.float32)


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in `master_dtype`: float32, or kept in float64."""
    return x.astype(master_dtype(x.dtype))


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel (d_in, d_out). HF stores nn.Linear weights as (d_out, d_in)
    (``hf_transpose=True``); GPT-2's Conv1D stores (d_in, d_out) (``hf_transpose=False``)."""

    def __init__(self, d_in: int, d_out: int, *, name: str, hf_name: str, rngs: nnx.Rngs, use_bias: bool = True,
                 hf_transpose: bool = True, init_std: float = 0.02, dtype=jnp.float32):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), init_std, dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if use_bias else None
        self.lora_a, self.lora_b, self.lora_scale = nnx.data(None), nnx.data(None), None  # see add_lora
        self.name, self.hf_name, self.hf_transpose = name, hf_name, hf_transpose
        self.d_in, self.d_out = d_in, d_out
        self.compute_dtype = jnp.dtype(dtype) if is_half(dtype) else None  # None: no cast (float32/float64)
        self.order = next(_CREATION)

    def add_lora(self, a: jax.Array, b: jax.Array, scale: float) -> None:
        """Give this module LoRA factors a (d_in, R), b (R, d_out) applied unmerged with ``scale``."""
        self.lora_a, self.lora_b, self.lora_scale = nnx.Param(a), nnx.Param(b), float(scale)

    def __call__(self, x: jax.Array, columns=None) -> jax.Array:
        """``columns`` (C,): only those outputs, from C columns of the kernel (an LM head read at C label words)."""
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        lora_a, lora_b = (None, None) if self.lora_a is None else (self.lora_a[...], self.lora_b[...])
        if self.compute_dtype is not None:  # half precision: every operand in the compute dtype
            x, kernel, bias, lora_a, lora_b = (t if t is None else t.astype(self.compute_dtype)
                                               for t in (x, kernel, bias, lora_a, lora_b))
        if columns is not None:
            columns = jnp.asarray(columns)
            kernel = jnp.take(kernel, columns, axis=1)
            bias = None if bias is None else jnp.take(bias, columns)
            lora_b = None if lora_b is None else jnp.take(lora_b, columns, axis=1)
        y = x @ kernel
        if bias is not None:
            y = y + bias
        if lora_b is not None:  # with b = 0 this adds an exact zero: the base output to the last bit
            y = y + (self.lora_scale * ((x @ lora_a) @ lora_b)).astype(y.dtype)
        return _tap(self.name, x, y, columns)

    def hf_params(self) -> list[tuple[str, str, Callable]]:
        t = (lambda w: w.T) if self.hf_transpose else (lambda w: w)
        out = [("kernel", "weight", t)]
        if self.bias is not None:
            out.append(("bias", "bias", lambda b: b))
        return out


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, hf_name: str, rngs: nnx.Rngs, init_std: float = 0.02,
                 dtype=jnp.float32):
        self.embedding = nnx.Param(_normal(rngs, (num, dim), init_std, dtype))
        self.hf_name = hf_name

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array, rows=None) -> jax.Array:
        """Tied output projection: logits = x @ Eᵀ; with ``rows`` (C,), only those vocabulary rows of E. The
        logits are float32 at least (a bfloat16 product accumulated and returned in float32)."""
        table = self.embedding[...] if rows is None else jnp.take(self.embedding[...], jnp.asarray(rows), axis=0)
        return jnp.matmul(x, table.T, preferred_element_type=master_dtype(jnp.result_type(x, table)))

    def hf_params(self):
        return [("embedding", "weight", lambda w: w)]


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, hf_name: str, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps, self.hf_name = eps, hf_name

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = at_least_float32(x)  # statistics in float32 at least, as PyTorch's kernels take them
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype) if is_half(x.dtype) else y

    def hf_params(self):
        return [("scale", "weight", lambda w: w), ("bias", "bias", lambda b: b)]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, hf_name: str, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps, self.hf_name = eps, hf_name

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = at_least_float32(x)  # HF upcasts half precision; float64 stays
        normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)

    def hf_params(self):
        return [("scale", "weight", lambda w: w)]


def masked_softmax_attention(q_BHLd, k_BHSd, v_BHSd, allowed_BHLS) -> jax.Array:
    """softmax(q kᵀ/√d) v with disallowed scores set to the dtype's minimum, as Hugging Face does, so a
    fully masked (padding) row stays finite. Returns (B, H, L, d)."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(q_BHLd.shape[-1], q_BHLd.dtype))
    scores = jnp.einsum("bhld,bhsd->bhls", q_BHLd, k_BHSd) * scale
    scores = at_least_float32(scores)  # the softmax in float32 at least, back to the values' dtype after
    scores = jnp.where(allowed_BHLS, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhls,bhsd->bhld", jax.nn.softmax(scores, axis=-1).astype(v_BHSd.dtype), v_BHSd)


def split_heads(x_BLD: jax.Array, num_heads: int) -> jax.Array:
    b, l, d = x_BLD.shape
    return x_BLD.reshape(b, l, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x_BHLd: jax.Array) -> jax.Array:
    b, h, l, d = x_BHLd.shape
    return x_BHLd.transpose(0, 2, 1, 3).reshape(b, l, h * d)


def causal_allowed(attention_mask_BL: jax.Array, window: int | None = None) -> jax.Array:
    """(B, 1, L, L) booleans for decoders: query l sees key s when s ≤ l, s is a real token and, with a sliding
    ``window``, l − s < window (Hugging Face's causal and sliding-window masks)."""
    pos_L = jnp.arange(attention_mask_BL.shape[1])
    allowed_LL = pos_L[None, :] <= pos_L[:, None]
    if window is not None:
        allowed_LL = allowed_LL & (pos_L[:, None] - pos_L[None, :] < window)
    return allowed_LL[None, None] & attention_mask_BL.astype(bool)[:, None, None, :]


def last_real_token(x_BLD: jax.Array, attention_mask_BL: jax.Array) -> jax.Array:
    """(B, D): each row of ``x_BLD`` at its rightmost real token, for left and right padding alike (HF's
    ``*ForSequenceClassification`` takes the rightmost token that is not ``pad_token_id``)."""
    pos_BL = jnp.arange(x_BLD.shape[1]) * attention_mask_BL.astype(jnp.int32)
    return jnp.take_along_axis(x_BLD, jnp.max(pos_BL, axis=1)[:, None, None], axis=1)[:, 0]


def layer_range(layers, start_layer: int, hidden_BLD, stop_layer: int | None):
    """The blocks a call runs: ``layers[start_layer:stop_layer]``. A model starts at block ``start_layer`` > 0 from
    ``hidden_BLD``, the input of that block (a frozen prefix's output, `jaxlin.prefix`), and with ``stop_layer``
    returns the input of that block instead of its outputs."""
    n = len(layers)
    if (start_layer > 0) != (hidden_BLD is not None) or not 0 <= start_layer <= n:
        raise ValueError(f"start_layer={start_layer} needs the hidden states entering that block (hidden_BLD) and "
                         f"lies in [1, {n}]; start_layer=0 runs the embeddings and takes no hidden_BLD")
    stop = n if stop_layer is None else stop_layer
    if not start_layer <= stop <= n:
        raise ValueError(f"stop_layer={stop_layer} must lie in [{start_layer}, {n}]")
    return [layers[i] for i in range(start_layer, stop)]


def check_label_readout(task: str, family: str) -> None:
    """A label-word readout (``label_token_ids``) reads the LM head: decoders loaded with task="causal_lm" only."""
    if family == "bert":
        raise ValueError("a label-word readout needs a language-model head, and jaxlin's BERT-style encoders have no "
                         "masked-LM head; load a decoder (GPT-2, Llama, Qwen2, Mistral or a GGUF) with "
                         "task='causal_lm', or classify with task='classification'")
    if task != "causal_lm":
        raise ValueError(f"a label-word readout needs the LM head: load the model with task='causal_lm' (it was "
                         f"loaded with task={task!r})")


ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} in the config; supported: {sorted(ACTIVATIONS)}") from None
