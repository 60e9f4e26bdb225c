"""The regularized linearized problem solved in parameter space, without a Gram (docs/scaling.md, "Primal solve").

With θ0 the trainable parameters, J the Jacobian of the model's outputs at θ0 (N examples × O outputs rows) and
r0 = Y − f(θ0) (Y one-hot of the labels), `primal_ridge` minimises the summed objective

    ½ Σ_i ‖f(x_i; θ0) + J_i δ − y_i‖² + (λ/2)‖δ‖²,   i.e. solves (JᵀJ + λI) δ = Jᵀ r0,

whose predictions J δ* = K (K + λI)⁻¹ r0 are those of `jaxlin.solve.kernel_ridge` with the eNTK K = J Jᵀ and the
same absolute ridge λ (docs/paper.md §4.2). `jaxlin.train.fit` minimises the mean loss (1/n)Σ_i plus
(strength/2)‖δ‖²: the same problem with λ = n · strength.

Why conjugate gradients and not optax's L-BFGS: the problem is a quadratic with a symmetric positive definite
Hessian JᵀJ + λI, for which CG is the optimal Krylov method; each iteration is exactly one matvec (one jvp and
one vjp per batch, one pass over the data) and yields its residual for free, while L-BFGS's line search spends
extra passes over the data per step to rediscover the exact step length CG computes in closed form. The matvec
streams batches (the data need not fit in memory at once), so the loop runs on the host over pytrees; the
per-batch work is jitted once per batch shape and the CG update once per parameter layout.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ._util import pytree_dataclass
from .solve import STATUSES, CGSolution
from .train import as_pytree, as_step_batch, batch_arrays
from .train_mesh import MeshPlan

__all__ = ["PrimalRidgeSolution", "primal_ridge"]


@pytree_dataclass(["value", "ridge", "iterations", "residual", "recursive_residual", "tol", "status_code",
                   "predictions", "change"], ["max_iters"])
class PrimalRidgeSolution(CGSolution):
    """value: δ (a pytree like θ0) with (JᵀJ + λI)δ ≈ Jᵀr0; residual: the true relative residual
    ‖(JᵀJ + λI)δ − Jᵀr0‖/‖Jᵀr0‖ (recomputed after the last iteration); iterations: CG iterations (each one pass
    over the data); `status` ("ok", "not_converged", "not_psd", "not_finite") and `message` as `CGSolution`'s.
    predictions: f(θ0) + Jδ on the eval batches (rows concatenated, (N_eval, O)), change: Jδ there; None without
    eval batches."""
    operator = "JᵀJ+λI"
    predictions: np.ndarray | None = None
    change: np.ndarray | None = None


# ------------------------------------------------------------------------------------------ per-batch pieces
def _fn_at(apply_fn, batch):
    return lambda p: apply_fn(p, batch)


def _weights(batch, like_BO):
    """(B, 1) weight of each row: its example_mask (0: padding that adds nothing)."""
    return batch["example_mask"].astype(like_BO.dtype)[:, None]


def _rhs(apply_fn, theta0, acc, batch):
    """acc + J_bᵀ r0_b, r0 = onehot(labels) − f(θ0) on the batch's real rows."""
    f0_BO, vjp = jax.vjp(_fn_at(apply_fn, batch), theta0)
    y_BO = jax.nn.one_hot(batch["labels"], f0_BO.shape[-1], dtype=f0_BO.dtype)
    (g,) = vjp((y_BO - f0_BO) * _weights(batch, f0_BO))
    return jax.tree.map(jnp.add, acc, g)


def _normal_matvec(apply_fn, theta0, v, acc, batch):
    """acc + J_bᵀ J_b v: one jvp and one vjp of the batch (the forward pass is shared by jax.linearize)."""
    f0_BO, jvp = jax.linearize(_fn_at(apply_fn, batch), theta0)
    jv_BO = jvp(v) * _weights(batch, f0_BO)
    (g,) = jax.linear_transpose(jvp, theta0)(jv_BO)
    return jax.tree.map(jnp.add, acc, g)


def _predict(apply_fn, theta0, delta, batch):
    """(f(θ0), Jδ) on the batch."""
    return jax.jvp(_fn_at(apply_fn, batch), (theta0,), (delta,))


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cg_update(x, r, p, ap, rs, lam):
    """One CG update given ap = JᵀJ p: → (x, r, p, ‖r‖², pᵀ(JᵀJ + λI)p). A non-positive curvature leaves x, r."""
    ap = jax.tree.map(lambda a, q: a + lam * q, ap, p)
    pap = _dot(p, ap)
    alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = jax.tree.map(lambda a, q: a + alpha * q, x, p)
    r = jax.tree.map(lambda a, q: a - alpha * q, r, ap)
    rs_new = _dot(r, r)
    p = jax.tree.map(lambda a, q: a + (rs_new / rs) * q, r, p)
    return x, r, p, rs_new, pap


def _true_residual(b, ax, x, lam):
    """‖Jᵀr0 − (JᵀJ + λI)x‖ and ‖Jᵀr0‖."""
    res = jax.tree.map(lambda g, a, q: g - a - lam * q, b, ax, x)
    return jnp.sqrt(_dot(res, res)), jnp.sqrt(_dot(b, b))


# The jits of the solve, shared by every call: the apply function is an argument (a pytree whose static parts
# compare by value), so a second solve with the same model and batch shapes compiles nothing. The accumulator
# (argument 2 of the per-batch sums) is donated.
_jit_rhs = jax.jit(_rhs, donate_argnums=(2,))
_jit_matvec = jax.jit(_normal_matvec, donate_argnums=(3,))
_jit_predict = jax.jit(_predict)
_jit_update = jax.jit(_cg_update)
_jit_residual = jax.jit(_true_residual)
_jit_zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t))
_jit_dot = jax.jit(_dot)


class _Runner:
    """The per-batch functions of one solve: on one device through the shared jits above, or on a mesh through
    `MeshPlan.jit` with explicit shardings (parameters, δ and the sums laid out like θ0, rows over the data axis)."""

    def __init__(self, apply_fn, theta0, plan: MeshPlan | None):
        self.plan = plan
        apply_fn = as_pytree(apply_fn)
        if plan is None:
            self.apply_fn, self.theta0 = apply_fn, theta0
            self._rhs, self._matvec, self._predict = _jit_rhs, _jit_matvec, _jit_predict
            self._batch = lambda b: b
            return
        self.apply_fn, self.theta0 = plan.place(apply_fn), plan.place(theta0)
        fs, ts = plan.shardings_like(self.apply_fn), plan.shardings_like(self.theta0)
        self._rhs = plan.jit(_rhs, (fs, ts, ts, plan.rows), ts, donate_argnums=(2,))
        self._matvec = plan.jit(_normal_matvec, (fs, ts, ts, ts, plan.rows), ts, donate_argnums=(3,))
        self._predict = plan.jit(_predict, (fs, ts, ts, plan.rows), (plan.replicated, plan.replicated))
        self._batch = plan.batch

    def _batches(self, batches, select=as_step_batch):
        for batch in (batches() if callable(batches) else batches):
            yield self._batch(select(batch))

    def zeros(self):
        return _jit_zeros(self.theta0)

    def rhs(self, batches):
        acc = self.zeros()
        for batch in self._batches(batches):
            acc = self._rhs(self.apply_fn, self.theta0, acc, batch)
        return acc

    def matvec(self, v, batches):
        """Σ_b J_bᵀ J_b v: one pass over the data."""
        acc = self.zeros()
        for batch in self._batches(batches):
            acc = self._matvec(self.apply_fn, self.theta0, v, acc, batch)
        return acc

    def predict(self, delta, batches):
        outs = [self._predict(self.apply_fn, self.theta0, delta, b) for b in self._batches(batches, batch_arrays)]
        f0, change = zip(*outs)
        f0, change = np.concatenate([np.asarray(a) for a in f0]), np.concatenate([np.asarray(a) for a in change])
        return f0 + change, change


def primal_ridge(apply_fn: Callable, trainable0, batches: Callable[[], Iterable[dict]] | Iterable[dict],
                 ridge: float, *, tol: float = 1e-8, max_iters: int = 500, eval_batches=None, mesh=None,
                 data_axis: str | tuple = "data") -> PrimalRidgeSolution:
    """δ minimising ½Σ‖f(θ0) + Jδ − Y‖² + (λ/2)‖δ‖² by CG on (JᵀJ + λI)δ = Jᵀr0, with no Gram (module doc).

    apply_fn: `(trainable, batch) -> logits (B, O)`, either function of `jaxlin.train.model_functions` (both have
    the Jacobian J at θ0 = trainable0). batches: a zero-argument function returning an iterable of batches (called
    once per pass, so batches can be streamed from disk), or a list; each batch has the model's inputs, "labels"
    (int class ids; Y is their one-hot over the O outputs) and optionally "example_mask" (rows with 0 add
    nothing). ridge: λ > 0, absolute, in the units of K = JJᵀ (`kernel_ridge`'s convention; `fit`'s mean-loss
    strength s is λ = n·s for n examples). tol: relative residual ‖(JᵀJ + λI)δ − Jᵀr0‖/‖Jᵀr0‖ to stop at (1e-8
    needs x64). max_iters: CG iterations at most, each one pass over the data (one jvp and one vjp per batch).
    eval_batches: batches (same forms) to return predictions f(θ0) + Jδ on. mesh: a `jax.sharding.Mesh`; batches
    are split over `data_axis` (with several processes each passes its own rows, as in `fit`), δ and the sums
    keep θ0's shardings (see `jaxlin.train_mesh.MeshPlan`).
    """
    if not np.isfinite(ridge) or not ridge > 0:
        raise ValueError(f"ridge={ridge} must be > 0 (absolute, in the units of K = JJᵀ; e.g. 1e-2 × the mean eNTK eigenvalue).")
    if not np.isfinite(tol) or not tol > 0:
        raise ValueError(f"tol={tol} must be > 0 (a relative residual, e.g. 1e-8; below ~1e-6 needs x64).")
    if not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise ValueError(f"max_iters={max_iters!r} must be a positive int (each iteration is one pass over the data).")
    if isinstance(batches, Iterable) and iter(batches) is batches:
        raise ValueError("batches is a one-shot iterator but CG passes over the data once per iteration; pass a "
                         "list or a zero-argument function that returns a fresh iterable.")
    run = _Runner(apply_fn, trainable0, None if mesh is None else MeshPlan(mesh, data_axis))
    lam = jnp.asarray(ridge, jax.tree.leaves(run.theta0)[0].dtype)
    b = run.rhs(batches)
    x, r, p = run.zeros(), b, b
    rs = float(_jit_dot(r, r))
    bnorm2 = rs
    thresh = tol * tol * (bnorm2 if bnorm2 > 0 else 1.0)
    k, broke = 0, False
    while k < max_iters and rs > thresh and np.isfinite(rs):
        x, r, p, rs_new, pap = _jit_update(x, r, p, run.matvec(p, batches), jnp.asarray(rs, lam.dtype), lam)
        k += 1
        if not float(pap) > 0:
            broke = True
            break
        rs = float(rs_new)
    res_norm, b_norm = map(float, _jit_residual(b, run.matvec(x, batches), x, lam))
    res = res_norm / (b_norm if b_norm > 0 else 1.0)
    code = STATUSES.index("not_psd" if broke else "ok" if res <= tol else "not_converged")
    code = code if np.isfinite(res) else STATUSES.index("not_finite")
    predictions = change = None
    if eval_batches is not None:
        predictions, change = run.predict(x, eval_batches)
    return PrimalRidgeSolution(x, np.asarray(ridge), np.asarray(k), np.asarray(res), np.asarray(np.sqrt(rs / (
        bnorm2 if bnorm2 > 0 else 1.0))), np.asarray(tol), np.asarray(code), int(max_iters), predictions, change)
