"""Several processes, one program: JAX's multi-controller runtime and the (``data``, ``model``) mesh.

Every process runs the same program. `initialize` joins them through ``jax.distributed.initialize`` (a
coordinator at HOST:PORT, the number of processes, this process's id), after which ``jax.devices()`` lists
the devices of every process; `parse_mesh` lays those global devices out as a (``data``, ``model``) mesh.
On CPU the processes exchange collectives through gloo: `initialize` sets
``jax_cpu_collectives_implementation="gloo"`` where the jax in use has that option (jax 0.10.1 has it, with
gloo as its default), so a version or a user config with another default does not leave CPU processes
without collectives.

The three values come from the arguments or, where an argument is None, from the environment variables
``JAXLIN_COORDINATOR`` (``HOST:PORT``), ``JAXLIN_NUM_PROCESSES`` and ``JAXLIN_PROCESS_ID``, which
``scripts/launch_local.sh N -- cmd ...`` sets for each local process. ``auto=True`` lets
``jax.distributed.initialize`` detect what is not given (TPU slices, SLURM, Open MPI). See docs/scaling.md.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

ENV_COORDINATOR = "JAXLIN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLIN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLIN_PROCESS_ID"
MESH_AXES = ("data", "model")
MODES = ("none", "auto")  # how processes find each other: given/$JAXLIN_* values only, or detected (TPU, SLURM)


def _int_or_none(value, name: str, env: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} (argument or ${env}) is not an integer; e.g. {name}=2") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False, *, timeout_s: int = 300) -> bool:
    """Join this process to a multi-process run; True when ``jax.distributed`` was initialised (now or
    before), False for a single-process run (no argument, no environment variable, ``auto`` off).

    Call it first, before any JAX computation. ``timeout_s``: how long to wait for every process to join."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_or_none(os.environ.get(ENV_NUM_PROCESSES) if num_processes is None else num_processes,
                                 "num_processes", ENV_NUM_PROCESSES)
    process_id = _int_or_none(os.environ.get(ENV_PROCESS_ID) if process_id is None else process_id, "process_id",
                              ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if jax.distributed.is_initialized():
        return True
    if not auto:
        if all(v is None for v in given.values()):
            return False
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"a multi-process run needs coordinator, num_processes and process_id; {missing} "
                             f"missing (pass --coordinator HOST:PORT --num-processes N --process-id I, or "
                             "--distributed auto where JAX can detect the cluster)")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator={coordinator!r} is not HOST:PORT; e.g. 127.0.0.1:12355")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be ≥ 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in 0..{num_processes - 1} for num_processes="
                         f"{num_processes}")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes results, arrays and reports."""
    return jax.process_index() == 0


def parse_mesh(text: str, devices=None) -> Mesh:
    """A (``data``, ``model``) mesh over ``devices`` (default: every global device) from ``"data=D,model=M"``;
    an axis left out has size 1 (``"data=8"`` is (8, 1)). The sizes must multiply to the device count."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} in {text!r} is unknown; use {' and '.join(MESH_AXES)}, e.g. "
                             f"data={len(devices)},model=1")
        if not eq or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh entry {part!r} in {text!r} is not AXIS=SIZE with a positive size; e.g. "
                             f"data={len(devices)},model=1")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} appears twice in {text!r}; give each axis once")
        sizes[name] = int(value)
    if not sizes:
        raise ValueError(f"mesh {text!r} names no axis; e.g. data={len(devices)},model=1")
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if shape[0] * shape[1] != len(devices):
        raise ValueError(f"mesh {text!r} has {shape[0]}×{shape[1]} = {shape[0] * shape[1]} devices, but there are "
                         f"{len(devices)} ({jax.process_count()} process(es)); choose sizes that multiply to "
                         f"{len(devices)}, e.g. data={len(devices)},model=1")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


__all__ = ["initialize", "parse_mesh", "is_main_process", "MESH_AXES", "ENV_COORDINATOR", "ENV_NUM_PROCESSES",
           "ENV_PROCESS_ID"]


def process_rows(batch: dict, *, fix: str) -> dict:
    """This process's equal share of a batch's rows, in process order: what `jaxlin.train.fit` and `evaluate` on
    a mesh take from each process (the whole batch with one process). `fix` names the setting that makes the rows
    split, for the one-line error when they do not."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    rows = len(next(iter(batch.values())))
    if rows % count:
        raise ValueError(f"a batch of {rows} examples does not split over {count} processes; choose {fix} as a "
                         f"multiple of {count}")
    share = rows // count
    return {k: v[index * share:(index + 1) * share] for k, v in batch.items()}


def to_host(tree):
    """`tree`'s arrays as numpy on this process; an array spread over several processes is gathered from all of
    them (`multihost_utils.process_allgather`), so every process gets the whole value."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)

