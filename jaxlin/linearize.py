"""The first-order Taylor model of any `f(params, *inputs)` at `params0` (docs/paper.md §4.1).

    f_lin(θ; x) = f(θ0; x) + J(x) (θ − θ0),   J(x) = ∂f(θ0; x)/∂θ

Two entry points:

- `linearize(f, params0)` returns a pure `f_lin(params, *inputs)` that runs one `jax.jvp` per call, so
  nothing is kept between batches; it is exact, differentiable w.r.t. `params` (reverse mode through the
  jvp) and jit-able. It holds no jit: the caller jits at its one visible place.
- `linearize_at(f, params0, *inputs)` fixes one batch and runs `jax.linearize` once, returning a
  `LinearizedBatch` whose `jvp`, `vjp` and `ntk_vector_product` reuse the stored primal residuals for
  many tangents / cotangents (e.g. CG on K, power iteration, Algorithm 1 probes).

Params are any pytree; inputs any pytrees of arrays. Tangents have the pytree structure and dtypes of
`params0`; cotangents the structure and dtypes of `f(params0, *inputs)`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax

from jaxlin._types import PyTree


def _tangent(params, params0):
    """θ − θ0, cast leaf by leaf to θ0's dtype (jvp requires tangent dtype == primal dtype)."""
    chex.assert_trees_all_equal_shapes(params, params0)  # θ has θ0's leaves and shapes; no silent broadcast
    return jax.tree.map(lambda p, p0: (p - p0).astype(p0.dtype), params, params0)


def linearize(f: Callable, params0: PyTree) -> Callable:
    """Return `f_lin(params, *inputs) = f(params0, *inputs) + jvp_θ f(params0, *inputs)[params − params0]`.

    `f(params, *inputs)` may return any pytree of arrays. `f_lin` is pure: it closes over `params0` only,
    recomputes the primal at θ0 per call (so memory is that of one forward + its jvp, nothing persists
    across batches), and `jax.grad` of a loss of `f_lin` w.r.t. `params` equals Jᵀ·(∂loss/∂f_lin).
    """

    def f_lin(params, *inputs):
        f0, df = jax.jvp(lambda p: f(p, *inputs), (params0,), (_tangent(params, params0),))
        return jax.tree.map(lambda a, b: a + b, f0, df)

    return f_lin


@dataclasses.dataclass(frozen=True)
class LinearizedBatch:
    """The linearization of `f` at `params0` on one fixed batch, from a single `jax.linearize`.

    Attributes:
      f0: outputs `f(params0, *inputs)` (a pytree).
      params0: the expansion point (used for shapes/dtypes of tangents).

    Methods (J = ∂f(params0, *inputs)/∂θ of this batch):
      jvp(tangent) -> J·tangent, a pytree like f0.
      vjp(cotangent) -> Jᵀ·cotangent, a pytree like params0 (`jax.linear_transpose` of the jvp).
      ntk_vector_product(v) -> J(Jᵀv) = K v, with K the batch's eNTK over all outputs.
      f_lin(params) -> f0 + J(params − params0).

    Memory: `jax.linearize` stores every primal residual of this batch's forward pass (the values the
    jvp needs: pre-activations, attention weights, ...), roughly the activation memory of one forward,
    times ~2–3, for as long as this object lives. In exchange each jvp/vjp costs about one forward
    pass and no re-evaluation of the primal. Use `linearize` when batches change.
    """

    f0: PyTree
    params0: PyTree
    _jvp_fn: Callable

    def jvp(self, tangent: PyTree) -> PyTree:
        return self._jvp_fn(tangent)

    def vjp(self, cotangent: PyTree) -> PyTree:
        (ct_params,) = jax.linear_transpose(self._jvp_fn, self.params0)(cotangent)
        return ct_params

    def ntk_vector_product(self, v: PyTree) -> PyTree:
        return self.jvp(self.vjp(v))

    def f_lin(self, params: PyTree) -> PyTree:
        return jax.tree.map(lambda a, b: a + b, self.f0, self.jvp(_tangent(params, self.params0)))


def linearize_at(f: Callable, params0: PyTree, *inputs) -> LinearizedBatch:
    """Linearize `f(·, *inputs)` at `params0` once for a fixed batch (see `LinearizedBatch` for memory)."""
    f0, jvp_fn = jax.linearize(lambda p: f(p, *inputs), params0)
    return LinearizedBatch(f0=f0, params0=params0, _jvp_fn=jvp_fn)
