"""Optional neural-tangents 0.6.5 backend: a minimal compatibility layer for current JAX.

neural-tangents 0.6.5 does not import on JAX ≥ 0.5: its package `__init__` pulls `experimental` (which
imports TensorFlow through jax2tf) and `stax`, and `_src/empirical.py` / `_src/utils/rules.py` import names
JAX has since moved. `load_neural_tangents()` applies, only when called, the smallest set of shims:

- `jax.core.{Jaxpr, JaxprEqn, Literal, Primitive, Var}` ← `jax._src.core` (only where missing);
- a `jax.util` module with `safe_map`, `safe_zip` ← `jax._src.util` (only where missing);
- `jax.interpreters.ad.zeros_like_p`: a placeholder Primitive (NT only uses it as a dict key in its
  structured-derivative rules);
- `empirical._std_basis` / `_unravel_array_into_pytree` are replaced by equivalents that read `.shape`
  instead of calling `jnp.size` / `jnp.shape` on `ShapeDtypeStruct`s (deprecated in JAX 0.10, an error
  later);
- the `neural_tangents` package `__init__` is bypassed (a namespace stub is registered) so only
  `neural_tangents._src.empirical` is imported: no TensorFlow, no stax.

Offered: NT's JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS. Not offered: STRUCTURED_DERIVATIVES (its
jaxpr interpreter relies on JAX internals that no longer exist) and AUTO (its `cost_analysis()[0]` indexing
fails on current JAX). The core package never imports this module; `jaxlin.ntk` imports it lazily for
implementation="neural_tangents".
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types

INSTALL = "pip install --no-deps neural-tangents==0.6.5 frozendict"
IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products")
_MODULE = None


def _patch_jax() -> None:
    import jax
    import jax._src.core as src_core
    import jax._src.util as src_util
    from jax.interpreters import ad

    for name in ("Jaxpr", "JaxprEqn", "Literal", "Primitive", "Var"):
        if not hasattr(jax.core, name):
            setattr(jax.core, name, getattr(src_core, name))
    if "jax.util" not in sys.modules:
        try:
            import jax.util  # noqa: F401
        except ImportError:
            util = types.ModuleType("jax.util")
            util.safe_map, util.safe_zip = src_util.safe_map, src_util.safe_zip
            sys.modules["jax.util"] = util
            jax.util = util
    if not hasattr(ad, "zeros_like_p"):
        ad.zeros_like_p = src_core.Primitive("zeros_like")


def _std_basis(pytree):
    import jax
    import jax.numpy as jnp

    leaves = jax.tree.leaves(pytree)
    eye = jnp.eye(sum(math.prod(leaf.shape) for leaf in leaves), dtype=jax.dtypes.result_type(*leaves))
    return _unravel_array_into_pytree(pytree, 1, eye)


def _unravel_array_into_pytree(pytree, axis, arr):
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves, treedef = jax.tree.flatten(pytree)
    axis = axis % arr.ndim if arr.ndim else axis
    sizes = [math.prod(np.shape(leaf)) for leaf in leaves]
    parts = jnp.split(arr, np.cumsum(sizes[:-1]), axis)
    shapes = [arr.shape[:axis] + tuple(np.shape(leaf)) + arr.shape[axis + 1:] for leaf in leaves]
    return jax.tree.unflatten(treedef, [p.reshape(s) for p, s in zip(parts, shapes)])


def load_neural_tangents():
    """Import and return `neural_tangents._src.empirical` after patching JAX (idempotent)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    spec = importlib.util.find_spec("neural_tangents")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"implementation='neural_tangents' needs neural-tangents; install it with: {INSTALL}")
    _patch_jax()
    if "neural_tangents" not in sys.modules:
        stub = types.ModuleType("neural_tangents")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["neural_tangents"] = stub
    from neural_tangents._src import empirical

    empirical._std_basis = _std_basis
    empirical._unravel_array_into_pytree = _unravel_array_into_pytree
    _MODULE = empirical
    return _MODULE


def nt_empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation="jacobian_contraction",
                        reduce="sum"):
    """NT's `empirical_ntk_fn(f, ...)` as `ntk(x1, x2, params)`, in jaxlin's sum (or NT's mean) convention.

    NT averages over `trace_axes`; with reduce="sum" the result is multiplied by the traced axes' sizes.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown NT implementation={implementation!r}; valid: {IMPLEMENTATIONS}.")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"unknown reduce={reduce!r}; valid: ('sum', 'mean').")
    import jax

    nt = load_neural_tangents()
    impl = {"jacobian_contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
            "ntk_vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}[implementation]
    trace_axes = tuple(trace_axes)
    nt_fn = nt.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=vmap_axes, implementation=impl)

    def ntk(x1, x2, params):
        k = nt_fn(x1, x2, params)
        if reduce == "sum" and trace_axes:
            out = jax.eval_shape(f, params, x1)
            k = k * math.prod(out.shape[a] for a in trace_axes)
        return k

    return ntk
