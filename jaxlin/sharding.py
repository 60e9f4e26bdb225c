"""Parameters sharded by rule: logical axis names per parameter, one rules mapping to mesh axes.

Every parameter leaf of a family has logical axis names (``LOGICAL_AXES``): ``embed`` (the residual width D),
``vocab``, ``heads`` (a projection's fused heads·head_dim columns, head-major, so a split on the ``model``
axis keeps whole heads when the head count divides it), ``kv_heads`` (the same for grouped keys and values),
``mlp`` (the MLP hidden width); ``head_dim`` is named in the rules for completeness, though jaxlin's
projections keep it fused with the heads. Norm scales and every bias are replicated, and so are position
and token-type tables along their (short) first axis. A rules mapping (``DEFAULT_RULES``) sends each
logical name to a mesh axis of a (``data``, ``model``) mesh, as MaxText and Flax's logical axis rules do:
``model`` for heads, MLP hidden and vocabulary (tensor parallelism), ``data`` for the embed axis
(FSDP-style: each weight's other large axis is split over the data-parallel devices and gathered by XLA
inside the jitted computation where it is needed). Pass ``rules={..., "embed": None}`` to keep full
copies along ``data`` when a model is small enough that gathering costs more than it saves.

A dimension whose size is not a multiple of its mesh axis, a mesh axis the mesh lacks, or a mesh axis
already used by an earlier dimension of the same leaf, falls back to replicated along that dimension: a
shard is never padded, and a ``PartitionSpec`` never names one mesh axis twice.

LoRA factors follow their base weight: ``lora_a`` (d_in, R) takes the kernel's input axis, ``lora_b``
(R, d_out) its output axis; the rank axis is replicated.

Placement (`place`) works on one process and on several (``jax.distributed``): an array is built with
``jax.make_array_from_callback``, so each process materialises only the shards of its own devices. See
docs/scaling.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "head_dim": None,
    "embed": "data",
}

# family -> {module attribute -> logical axes of its weight}: (d_in, d_out) of a dense kernel, (rows, width) of
# an embedding table. Norm scales and biases need no entry: they are always replicated.
LOGICAL_AXES: dict[str, dict[str, tuple]] = {
    "bert": {
        "word": ("vocab", "embed"), "position": (None, "embed"), "token_type": (None, "embed"),
        "query": ("embed", "heads"), "key": ("embed", "heads"), "value": ("embed", "heads"),
        "attn_out": ("heads", "embed"), "intermediate": ("embed", "mlp"), "output": ("mlp", "embed"),
        "pooler": ("embed", None), "head_dense": ("embed", None), "classifier": ("embed", None),
    },
    "gpt2": {
        "wte": ("vocab", "embed"), "wpe": (None, "embed"),
        "c_attn": ("embed", "heads"),  # fused q, k, v columns
        "attn_proj": ("heads", "embed"), "c_fc": ("embed", "mlp"), "mlp_proj": ("mlp", "embed"),
        "score": ("embed", None),
    },
    "llama": {
        "embed_tokens": ("vocab", "embed"),
        "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
        "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
        "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab"), "score": ("embed", None),
    },
}
_REPLICATED_LEAVES = ("bias", "scale")


def leaf_axes(family: str, path: tuple, ndim: int) -> tuple:
    """Logical axis names of the parameter at ``path`` (a params path such as ("layers", 3, "query", "kernel"))
    of a ``family`` model; ``ndim`` entries, None for a replicated dimension."""
    leaf = path[-1]
    if leaf in _REPLICATED_LEAVES:
        return (None,) * ndim
    if family not in LOGICAL_AXES:
        raise ValueError(f"no sharding table for family {family!r}; add one to jaxlin.sharding.LOGICAL_AXES "
                         f"(families with one: {sorted(LOGICAL_AXES)})")
    owner = next((k for k in reversed(path[:-1]) if isinstance(k, str)), None)
    axes = LOGICAL_AXES[family].get(owner)
    if axes is None or leaf not in ("kernel", "embedding", "lora_a", "lora_b"):
        raise ValueError(f"parameter {'/'.join(map(str, path))} of the {family} family has no logical axes; add "
                         f"{owner!r} to jaxlin.sharding.LOGICAL_AXES[{family!r}]")
    if leaf == "lora_a":
        return (axes[0], None)
    if leaf == "lora_b":
        return (None, axes[1])
    return axes


def logical_axes(model) -> dict:
    """A tree like ``model.params`` holding each leaf's logical axes as a ``PartitionSpec`` of logical names."""
    flat = traverse_util.flatten_dict(model.params)
    return traverse_util.unflatten_dict({p: P(*leaf_axes(model.family, p, np.ndim(v))) for p, v in flat.items()})


def spec_for(axes: tuple, shape: tuple, mesh: Mesh, rules: Mapping | None = None) -> P:
    """The ``PartitionSpec`` of a leaf with logical ``axes`` and ``shape`` on ``mesh`` (module docstring: a
    dimension that does not divide its mesh axis stays replicated)."""
    rules = DEFAULT_RULES if rules is None else rules
    unknown = [a for a in axes if a is not None and a not in rules]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} has no rule; the rules map {sorted(rules)}: add "
                         f"{unknown[0]!r} (to a mesh axis or None)")
    spec, used = [], set()
    for name, size in zip(axes, shape):
        axis = None if name is None else rules[name]
        if axis is None or axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return P(*spec)


def flat_shardings(family: str, flat: dict, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """``{path: NamedSharding}`` for a flat ``{path: array or ShapeDtypeStruct}`` of a ``family`` model."""
    return {p: NamedSharding(mesh, spec_for(leaf_axes(family, p, len(v.shape)), tuple(v.shape), mesh, rules))
            for p, v in flat.items()}


def param_shardings(model, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """A tree like ``model.params`` of ``NamedSharding``s on ``mesh`` by ``rules`` (default `DEFAULT_RULES`)."""
    flat = traverse_util.flatten_dict(model.params)
    return traverse_util.unflatten_dict(flat_shardings(model.family, flat, mesh, rules))


def adapted_shardings(adapted, mesh: Mesh, rules: Mapping | None = None) -> tuple[dict, dict]:
    """``(trainable, frozen)`` trees of ``NamedSharding``s for a `jaxlin.adapters.Adapted`: base leaves by the
    rules, each LoRA factor by its base weight's axes (lora_a the input axis, lora_b the output axis)."""
    family = adapted.model.family
    frozen = traverse_util.unflatten_dict(flat_shardings(family, traverse_util.flatten_dict(adapted.frozen), mesh,
                                                     rules))
    params = flat_shardings(family, traverse_util.flatten_dict(adapted.trainable.get("params", {})), mesh, rules)
    lora = {}
    for name, ab in adapted.trainable.get("lora", {}).items():
        path = adapted.model.module(name).path
        lora[name] = {k: NamedSharding(mesh, spec_for(leaf_axes(family, path + (f"lora_{k}",), 2), np.shape(v),
                                                      mesh, rules)) for k, v in ab.items()}
    trainable = {**adapted.trainable, "lora": lora, "params": traverse_util.unflatten_dict(params)}
    return trainable, frozen


def place(tree, shardings):
    """Put each leaf of ``tree`` on its sharding in ``shardings`` (a tree of the same structure). A host value
    (numpy, or an array of this process) is cut with ``jax.make_array_from_callback``, so on several processes
    each builds only its own devices' shards (every process must hold the same value); a global array already
    on its sharding is kept, one on another sharding is resharded."""

    def one(value, sharding):
        if isinstance(value, jax.Array):
            if value.sharding == sharding:
                return value
            if not value.is_fully_addressable or sharding.is_fully_addressable:
                return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def shard_model(model, mesh: Mesh, rules: Mapping | None = None):
    """``model`` with every parameter placed by `param_shardings` (the same `jaxlin.models.Model` otherwise)."""
    return dataclasses.replace(model, params=place(model.params, param_shardings(model, mesh, rules)))


def shard_adapted(adapted, mesh: Mesh, rules: Mapping | None = None):
    """``adapted`` with its trainable and frozen trees placed by `adapted_shardings`."""
    trainable_s, frozen_s = adapted_shardings(adapted, mesh, rules)
    return dataclasses.replace(adapted, trainable=place(adapted.trainable, trainable_s),
                               frozen=place(adapted.frozen, frozen_s))


def bytes_per_device(model, mesh: Mesh, rules: Mapping | None = None) -> int:
    """Bytes of ``model``'s parameters each device of ``mesh`` holds under ``rules`` (no array is placed; every
    device holds the same amount, since a dimension is only split where it divides evenly)."""
    flat = traverse_util.flatten_dict(model.params)
    shardings = flat_shardings(model.family, flat, mesh, rules)
    return int(sum(np.prod(shardings[p].shard_shape(np.shape(v)), dtype=np.int64) * np.dtype(v.dtype).itemsize
                   for p, v in flat.items()))


def is_on_mesh(value: Any, mesh: Mesh) -> bool:
    """Whether ``value`` is a jax.Array already laid out with a ``NamedSharding`` on ``mesh``."""
    return isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh


__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "leaf_axes", "logical_axes", "spec_for", "flat_shardings",
           "param_shardings", "adapted_shardings", "place", "shard_model", "shard_adapted", "bytes_per_device",
           "is_on_mesh"]
