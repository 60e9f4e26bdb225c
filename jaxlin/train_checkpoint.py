"""Preemption-safe training state for `jaxlin.train.fit`, stored with Orbax (docs/scaling.md).

A checkpoint of step t holds the trainable tree and the optimiser state (Orbax `StandardSave`: sharded arrays
are written by the processes that own their shards and read back with the shardings of the fresh run's state),
and a JSON item with everything else `fit` needs to continue on the same trajectory: the step, the data-order
position (epoch, batches of that epoch consumed), the losses and regulariser statistics so far, the evaluations
so far, and the run's key.

The key says which run a checkpoint belongs to: the `TrainConfig`, the number of steps, a digest of the
trainable tree θ0, of the step function's arrays (frozen weights, θ0 of a linearized model, a gate) and of the
optimiser state's layout, a digest of the first epoch's batches, and a free-form `checkpoint_key`. A directory
holding a checkpoint of another key is refused with one line that names the parts that differ.

Array digests are exact and independent of sharding: each leaf's bits, read as unsigned integers, are summed
plain and position-weighted modulo 2³² on the device (integer sums do not depend on the reduction order), so
only two numbers per leaf come back to the host and no process needs arrays it does not own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TrainCheckpoint", "fit_checkpointing", "run_key", "tree_digest"]


def fit_checkpointing(directory, name: str, every: int, key: str) -> dict:
    """`jaxlin.train.fit`'s checkpoint arguments for one of several fits that share a checkpoint `directory`: its
    own subdirectory `name`, every `every` steps, under `key`; {} when `directory` is None (no checkpoints)."""
    if directory is None:
        return {}
    return {"checkpoint_dir": os.path.join(directory, name), "checkpoint_every": every, "checkpoint_key": key}


def _leaf_checksum(x):
    """(Σ bits, Σ bits·(2i+1)) mod 2³² over the elements i of x, bits = x's bytes read as unsigned ints."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).reshape(-1)
    if x.dtype.itemsize == 8:
        bits = (bits & 0xFFFFFFFF).astype(jnp.uint32) + (bits >> 32).astype(jnp.uint32)
    bits = bits.astype(jnp.uint32)
    weight = (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1).astype(jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_checksums = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def tree_digest(tree, *, values: bool = True) -> str:
    """SHA-256 of `tree`'s leaf paths, shapes, dtypes and (values=True) an exact checksum of their values."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    h = hashlib.sha256()
    for path, leaf in flat:
        h.update(f"{jax.tree_util.keystr(path)}:{np.shape(leaf)}:{jnp.result_type(leaf)};".encode())
    if values and flat:
        h.update(np.asarray(jax.device_get(_checksums([leaf for _, leaf in flat]))).tobytes())
    return h.hexdigest()


def _batches_digest(batches: list) -> str:
    """Digest of a list of batches: names, shapes, dtypes and, with one process, their bytes (with several,
    each process holds other rows, so only what is the same on every process enters)."""
    h = hashlib.sha256()
    whole = jax.process_count() == 1
    for batch in batches:
        for name in sorted(batch):
            a = np.asarray(batch[name]) if whole else batch[name]
            h.update(f"{name}:{np.shape(a)}:{np.dtype(a.dtype).name};".encode())
            if whole:
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_key(config, *, total_steps: int, trainable0, step_fn, opt_state, first_epoch: list,
            checkpoint_key: str = "") -> dict:
    """The identity of a `fit` run (module doc), a JSON-able dict."""
    return {"config": dataclasses.asdict(config), "total_steps": int(total_steps),
            "steps_per_epoch": len(first_epoch), "trainable0": tree_digest(trainable0),
            "step_function": tree_digest(step_fn), "opt_state": tree_digest(opt_state, values=False),
            "data": _batches_digest(first_epoch), "checkpoint_key": str(checkpoint_key)}


class TrainCheckpoint:
    """Orbax checkpoints of one `fit` run in `directory` (the latest two steps are kept).

    `restore(trainable, opt_state)` -> None when the directory holds no checkpoint, else (trainable, opt_state,
    meta) of the latest step, arrays with the shardings of the given trees; `save(step, trainable, opt_state,
    meta)` writes one synchronously (the next step donates these buffers, so the write must be over first).
    Every process calls both (Orbax coordinates who writes what)."""

    def __init__(self, directory: str | os.PathLike, key: dict):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.key = key
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=2)))

    def restore(self, trainable, opt_state) -> tuple[Any, Any, dict] | None:
        ocp = self._ocp
        step = self._manager.latest_step()
        if step is None:
            return None
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        old, new = meta.get("key", {}), as_json(self.key)
        if old != new:
            self.close()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"checkpoint_dir {self.directory!r} holds a checkpoint of another run (its key differs "
                             f"in {diff}); pass a fresh checkpoint_dir, delete this one, or restore the same inputs")
        (t_leaves, t_def), (o_leaves, o_def) = (jax.tree.flatten(t) for t in (trainable, opt_state))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                _arrays(t_leaves, o_leaves))
        state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = state["state"]
        return (jax.tree.unflatten(t_def, list(state["trainable"])),
                jax.tree.unflatten(o_def, list(state.get("opt_state", []))), meta)

    def save(self, step: int, trainable, opt_state, meta: dict) -> None:
        ocp = self._ocp
        state = _arrays(jax.tree.leaves(trainable), jax.tree.leaves(opt_state))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "key": self.key})), force=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _arrays(trainable_leaves: list, opt_leaves: list) -> dict:
    """The saved array item: {"trainable": [...], "opt_state": [...]} (an empty list left out: Orbax stores
    no empty subtree)."""
    out = {"trainable": list(trainable_leaves)}
    if opt_leaves:
        out["opt_state"] = list(opt_leaves)
    return out


def json_floats(values: list) -> list:
    """Host floats of a list of scalars (device arrays or floats), JSON-exact (repr round-trips a float)."""
    return [None if v is None else float(v) for v in jax.device_get(list(values))]


def as_json(value) -> Any:
    """`value` through a JSON round trip (what a restored checkpoint's meta item looks like)."""
    return json.loads(json.dumps(value))
