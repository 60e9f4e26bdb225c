"""Small helpers shared by several jaxlin modules (internal): one home each.

`per_example` (f on one example), `leading_size` (the shared example axis of a pytree), `to_jsonable`
(results → JSON-ready Python) and `loglog_slope` (power-law exponents of sweeps and plots).
"""
import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np

from jaxlin._types import PyTree


def per_example(f: Callable) -> Callable:
    """`f(params, x_batch) -> (N, ...)` as `f_ex(params, x_i) -> (...)` on one example (a batch of one)."""
    def f_ex(params, x_i):
        return f(params, jax.tree.map(lambda a: a[None], x_i))[0]
    return f_ex


def leading_size(x: PyTree, name: str) -> int:
    """The leading (example) axis length shared by every leaf of `x`; ValueError naming `name` otherwise."""
    sizes = {np.shape(leaf)[:1] for leaf in jax.tree.leaves(x)}
    if len(sizes) != 1 or sizes == {()}:
        raise ValueError(f"{name} must be a pytree of arrays sharing one leading example axis; got leaf "
                         f"shapes {[np.shape(leaf) for leaf in jax.tree.leaves(x)]}.")
    return sizes.pop()[0]


def to_jsonable(obj):
    """Turn results into JSON-ready Python: arrays → lists, numpy/JAX scalars → float/int/bool.

    Non-finite floats become the strings "inf", "-inf" and "nan" (not None, so the value survives a round
    trip); dicts, lists and tuples are converted recursively (tuples become lists), strings and None pass.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, type(None))):
        return obj
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    raise ValueError(f"to_jsonable cannot convert {type(obj).__name__}; pass dicts, sequences, arrays or numbers")


def loglog_slope(x: Sequence[float], y: Sequence[float | None]) -> float:
    """Least-squares slope of log(y) against log(x), over the pairs with x > 0 and a finite y > 0;
    nan when fewer than two distinct x remain."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if b is not None and a > 0 and math.isfinite(float(b)) and float(b) > 0]
    if len({a for a, _ in pairs}) < 2:
        return math.nan
    return float(np.polyfit(np.log([a for a, _ in pairs]), np.log([b for _, b in pairs]), 1)[0])


def pytree_dataclass(data, meta=()):
    """A frozen dataclass registered as a pytree: fields ``data`` are its leaves, ``meta`` static (results that pass
    through jit, e.g. `jaxlin.solve.CGSolution`)."""
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
    return wrap
