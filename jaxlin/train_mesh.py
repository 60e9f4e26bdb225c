"""Where a training run's arrays live on a device mesh (docs/scaling.md, "Training on a mesh").

`MeshPlan(mesh, data_axis)` is the one rule set of `jaxlin.train.fit` and `evaluate` under a mesh:

- a batch's leading (example) axis is split over `data_axis` (`NamedSharding(mesh, P(data_axis))`); with several
  processes each passes its own rows and `jax.make_array_from_process_local_data` assembles the global batch;
- every other array keeps the sharding it comes with when that sharding lives on the mesh's devices (e.g. the
  parameter shardings of `jaxlin.load_pretrained(..., mesh=)`, or any `NamedSharding` the caller chose) and is
  replicated over the mesh otherwise (numpy arrays, arrays on one device);
- optimiser state follows the parameters: a state leaf whose key path ends with a parameter's path and has its
  shape (Adam's mu and nu, a prox anchor) takes that parameter's sharding; the rest (step counts, λ) is
  replicated;
- the step is jitted with these as explicit `in_shardings`/`out_shardings` (trainable and optimiser state keep
  their layout across steps, metrics come back replicated), one jit per layout, kept in a small cache, so a second
  `fit` with the same model, optimiser object and layout compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .sharding import place

__all__ = ["MeshPlan"]


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """mesh: a `jax.sharding.Mesh`; data_axis: the mesh axis (or tuple of axes) the examples of a batch are split
    over. Every other axis of the mesh (e.g. "model") is used only by the arrays' own shardings."""

    mesh: Mesh
    data_axis: str | tuple = "data"

    def __post_init__(self):
        axes = self.data_axis if isinstance(self.data_axis, tuple) else (self.data_axis,)
        missing = [a for a in axes if a not in self.mesh.shape]
        if missing:
            raise ValueError(f"data_axis={self.data_axis!r} is not an axis of the mesh {dict(self.mesh.shape)}; "
                             f"pass one of {tuple(self.mesh.shape)}")

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.data_axis))

    @property
    def data_size(self) -> int:
        axes = self.data_axis if isinstance(self.data_axis, tuple) else (self.data_axis,)
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def shardings_like(self, tree):
        """Per leaf: its own sharding when it is an array on exactly the mesh's devices, else replicated."""
        devices = set(self.mesh.devices.flat)

        def one(leaf):
            if isinstance(leaf, jax.Array) and leaf.sharding.device_set == devices:
                return leaf.sharding
            return self.replicated

        return jax.tree.map(one, tree)

    def place(self, tree):
        """`tree` on the mesh per `shardings_like` (arrays already there are not copied; host values are cut per
        device by `jaxlin.sharding.place`, so several processes each build only their own shards)."""
        return place(tree, self.shardings_like(tree))

    def opt_state_shardings(self, opt_state, trainable, trainable_shardings):
        """Shardings of `opt_state` (arrays or ShapeDtypeStructs): a leaf whose key path ends with a parameter's
        path and has its shape takes that parameter's sharding (longest such path), other leaves are replicated."""
        params = {}
        for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                                          jax.tree.leaves(trainable_shardings)):
            params[tuple(map(str, path))] = (tuple(np.shape(leaf)), sharding)

        def one(path, leaf):
            path = tuple(map(str, path))
            for start in range(len(path) + 1):
                shape_sharding = params.get(path[start:])
                if shape_sharding is not None and shape_sharding[0] == tuple(np.shape(leaf)):
                    return shape_sharding[1]
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, opt_state)

    def batch(self, batch: dict) -> dict:
        """The batch's arrays split over the data axis: this process's rows, assembled into global arrays."""
        rows = jax.process_count() * int(np.shape(next(iter(batch.values())))[0])
        if rows % self.data_size:
            raise ValueError(f"a batch of {rows} examples does not split over mesh axis {self.data_axis!r} of size "
                             f"{self.data_size}; use a batch_size that is a multiple of {self.data_size}")
        if jax.process_count() == 1:
            return jax.device_put(batch, self.rows)
        return {k: jax.make_array_from_process_local_data(self.rows, np.asarray(v)) for k, v in batch.items()}

    def global_rows(self, x) -> np.ndarray:
        """A host array of this process's rows → all processes' rows, in process order (identity with one)."""
        if jax.process_count() == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))

    def jit(self, fn: Callable, in_shardings: tuple, out_shardings, donate_argnums: tuple = ()):
        """`jax.jit(fn, in_shardings=, out_shardings=, donate_argnums=)`, one per distinct layout (cached)."""
        return _cached_jit(fn, _layout(in_shardings), _layout(out_shardings), tuple(donate_argnums))


def _layout(tree) -> tuple:
    """A hashable form of a pytree of shardings: (treedef, leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _cached_jit(fn, in_layout, out_layout, donate_argnums):
    unflatten = lambda layout: jax.tree.unflatten(*layout)  # noqa: E731
    return jax.jit(fn, in_shardings=unflatten(in_layout), out_shardings=unflatten(out_layout),
                   donate_argnums=donate_argnums)
