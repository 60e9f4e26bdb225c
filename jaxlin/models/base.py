"""The loaded model: a pure ``apply(params, input_ids, attention_mask)`` plus what adapters need."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data import DataError

from .layers import tapping


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """One dense module: its jaxlin name, where its parameters sit in ``params`` and its shape."""

    name: str  # "layer3.attention.query"
    path: tuple  # ("layers", 3, "query"); kernel at params[path]["kernel"]
    d_in: int
    d_out: int
    has_bias: bool
    hf_name: str  # "bert.encoder.layer.3.attention.self.query"
    layer: int | None  # block index, None for embeddings/heads

    @property
    def projection(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A checkpoint as a pure function. ``apply(params, input_ids (B, L), attention_mask (B, L))`` returns
    hidden states (B, L, D) for ``task="encoder"``, logits (B, C) for ``"classification"`` and (B, L, V) for
    ``"causal_lm"``. ``params`` is a plain nested dict; the NNX graph was split once, at load time."""

    apply: Callable[..., jax.Array]
    params: Any
    config: Any  # the transformers config
    tokenizer: Any  # jaxlin.models.tokenizer.Tokenizer or None
    family: str
    task: str
    modules: tuple[ModuleInfo, ...]
    graphdef: Any
    source: str = ""
    new_tensors: tuple[str, ...] = ()  # HF names initialised from the seed (e.g. a new classification head)
    kind: str = ""  # the family's registered kind, "encoder" or "decoder" (jaxlin.models.family_kind)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    @property
    def num_layers(self) -> int:
        return 1 + max((m.layer for m in self.modules if m.layer is not None), default=-1)

    def module(self, name: str) -> ModuleInfo:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module named {name!r}; modules look like {self.module_names[:4]}")

    def tapped_apply(self, params, probes: dict, input_ids, attention_mask, *, capture=(), **kwargs):
        """``apply`` with ``probes[name]`` added to the output of each named dense module and the inputs of
        the ``capture`` modules returned: ``(outputs, {name: input (B, L, d_in)})``. Pure and jit-able.
        ``kwargs`` go to the model call (e.g. ``label_token_ids``)."""
        with tapping(probes, capture) as state:
            out = self.apply(params, input_ids, attention_mask, **kwargs)
        return out, dict(state.inputs)


def make_apply(graphdef, config) -> Callable:
    def apply(params, input_ids, attention_mask, **kwargs):
        check_inputs(config, input_ids, attention_mask)
        return nnx.merge(graphdef, params)(jnp.asarray(input_ids), jnp.asarray(attention_mask), **kwargs)

    return apply


def max_input_length(config) -> int | None:
    """The longest sequence the family's learned position embeddings cover; None for rotary families."""
    from . import family_for

    limit = family_for(config).get("max_length")
    return None if limit is None else int(limit(config))


def check_inputs(model_or_config, input_ids, attention_mask) -> None:
    """Refuse inputs a model would turn into NaN or wrong rows without an error, with a DataError naming the
    value and the fix: ids and mask not both (B, L); a length L past the learned positions (BERT, RoBERTa,
    GPT-2; the shape is static, so this holds under jit too); token ids outside [0, vocab_size) (an id past
    the table gives a NaN row, a negative id indexes from its end). The ids are read on the host once, only
    when concrete: a tracer passes untouched, so jitted callers check their concrete inputs before the jit."""
    config = getattr(model_or_config, "config", model_or_config)
    ids_shape, mask_shape = np.shape(input_ids), np.shape(attention_mask)
    if len(ids_shape) != 2 or ids_shape != mask_shape:
        raise DataError(f"input_ids {ids_shape} and attention_mask {mask_shape} must both be (batch, length); "
                        "pad the batch with jaxlin.data.pad_batch")
    limit = max_input_length(config)
    if limit is not None and ids_shape[1] > limit:
        fit = limit // 8 * 8 or limit  # batches pad their length up to a multiple of 8
        raise DataError(f"sequence length {ids_shape[1]} exceeds the {limit} positions this {config.model_type} "
                        f"model has learned embeddings for; truncate: pass --max-length {fit} (max_length= in "
                        "Python) or less")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise DataError(f"input_ids have dtype {ids.dtype}; token ids must be integers (tokenize the texts)")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        row, col = np.argwhere((ids < 0) | (ids >= config.vocab_size))[0]
        raise DataError(f"input_ids[{row}, {col}] = {ids[row, col]} is outside this model's vocabulary "
                        f"[0, {config.vocab_size}); tokenize with the model's own tokenizer (an id past the "
                        "table gives NaN, a negative one a wrong row)")


def module_infos(model: nnx.Module) -> tuple[ModuleInfo, ...]:
    from .layers import Linear

    infos = []
    for path, node in nnx.iter_modules(model):
        if isinstance(node, Linear):
            layer = path[path.index("layers") + 1] if "layers" in path else None
            infos.append((node.order, ModuleInfo(node.name, tuple(path), node.d_in, node.d_out,
                                                 node.bias is not None, node.hf_name, layer)))
    return tuple(info for _, info in sorted(infos, key=lambda t: t[0]))  # the order the family defines them


def reject_encoder_head(head) -> None:
    """Decoders classify with a linear ``score`` on the last real token; ``head`` is for BERT-style encoders."""
    if head is not None:
        raise ValueError(f"head={head!r} applies to BERT-style encoders only; decoders classify with a linear "
                         "'score' on the last real token: leave head=None")
