"""Kernel ridge regression with the empirical NTK, and GD dynamics in function space (docs/paper.md §4.2–4.3).

Linearized fine-tuning with squared loss ½‖f(X) − Y‖² (summed over examples and outputs) and the
always-on pull (λ/2)‖δ‖², δ = θ − θ0, is KRR with K = J Jᵀ and r0 = Y − f0(X):

    δ* = Jᵀ(K + λI)⁻¹ r0            f̄*(x) = f0(x) + K(x, X) α,  α = (K + λI)⁻¹ r0
    residual Y − f̄*(X) = λ α         objective ½λ r0ᵀ(K + λI)⁻¹ r0        ‖δ*‖² = r0ᵀK(K + λI)⁻² r0

Units. `ridge` λ is in the units of K (an absolute eigenvalue shift); with ridge_scale="trace" the value
is relative: λ_abs = ridge · trace(K)/n, i.e. a multiple of the mean eigenvalue. `learning_rate` η is in
units of 1/K: GD on δ is stable iff 0 < η < 2/(μ_max + λ). Flow `times` are in units of η·steps.

Shapes. A kernel is `gram_NN` (n, n), or `gram_NNOO` (N, N, O, O), flattened example-major to (N·O, N·O).
Targets/residuals are (n,), (n, O) with a kernel shared by O outputs (independent columns), or (N, O)
with N·O = n for a full per-output kernel. Results come back in the shape of the targets.
All maths runs in float64 when x64 is enabled (float32 otherwise); float32 inputs are accepted.

Inputs. Kernels and targets must be finite, and a kernel symmetric up to rounding (‖K − Kᵀ‖_F/‖K‖_F at most
1e-6 for float64 input, 1e-4 for float32): concrete inputs that are not raise a ValueError naming the input;
traced inputs (a caller's jit) cannot raise, so they come back with status "not_finite" or "not_symmetric".
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._types import Array
from jaxlin._util import pytree_dataclass

# Ordered by precedence: a result's status is the largest code that applies (bad inputs outrank the rest).
STATUSES = ("ok", "not_psd", "not_converged", "unstable", "not_symmetric", "not_finite")
_OK, _NOT_PSD, _NOT_CONVERGED, _UNSTABLE, _NOT_SYMMETRIC, _NOT_FINITE = range(6)


def _dt():
    return jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 under x64, else float32


def _concrete(x):
    """numpy value of x, or None while tracing."""
    leaves = jax.tree_util.tree_leaves(x)
    if any(isinstance(v, jax.core.Tracer) for v in leaves):
        return None
    return np.asarray(x)


def _asymmetry_tol(dtype) -> float:
    """Largest ‖K − Kᵀ‖_F/‖K‖_F accepted as rounding for a kernel given in `dtype`."""
    return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _finite_code(x: Array, name: str) -> Array:
    """Refuse a concrete `x` with NaN/inf entries (ValueError naming `name` and the count); the status code
    (_OK, or _NOT_FINITE for a traced `x`) to return instead."""
    bad = jnp.sum(~jnp.isfinite(x))
    if isinstance(x, jax.core.Tracer):
        return jnp.where(bad > 0, _NOT_FINITE, _OK).astype(jnp.int32)
    if int(bad):
        raise ValueError(f"{name} has {int(bad)} non-finite (NaN or inf) entries of {x.size}; the solvers need "
                         f"finite inputs: find where they come from (a NaN model output, a missing label) and "
                         "fix or drop those examples.")
    return jnp.asarray(_OK, jnp.int32)


def _symmetric_code(gram_nn: Array, name: str, tol: float) -> Array:
    """Refuse a concrete kernel with ‖K − Kᵀ‖_F/‖K‖_F > tol (ValueError with the value and the fix); the
    status code (_OK, or _NOT_SYMMETRIC for a traced kernel) to return instead."""
    norm = jnp.linalg.norm(gram_nn)
    asym = jnp.where(norm > 0, jnp.linalg.norm(gram_nn - gram_nn.T) / jnp.where(norm > 0, norm, 1.0), 0.0)
    if isinstance(gram_nn, jax.core.Tracer):
        return jnp.where(asym > tol, _NOT_SYMMETRIC, _OK).astype(jnp.int32)
    if float(asym) > tol:
        raise ValueError(f"{name} is not symmetric: ‖K − Kᵀ‖_F/‖K‖_F = {float(asym):.3g} > {tol:g}. If the "
                         "asymmetry is rounding you mean to remove, pass (K + K.T)/2 explicitly; an asymmetric "
                         "kernel (e.g. the sign kernel J·s(J)ᵀ) has no kernel ridge regression: use "
                         "jaxlin.spectrum.sign_kernel_stats for it.")
    return jnp.asarray(_OK, jnp.int32)


def _gram_matrix(gram, name="gram") -> tuple[Array, Array]:
    """(n, n) or (N, N, O, O) → symmetrised (N·O, N·O) matrix in the compute dtype, and the input's status
    code (a concrete kernel that is not finite and symmetric is refused here)."""
    gram = jnp.asarray(gram)
    tol = _asymmetry_tol(gram.dtype)
    if gram.ndim == 4:
        n1, n2, o1, o2 = gram.shape
        if n1 != n2 or o1 != o2:
            raise ValueError(f"{name} of shape {gram.shape} is not an (N, N, O, O) kernel; "
                             "pass the training Gram K(X, X) with matching example and output axes.")
        gram = gram.transpose(0, 2, 1, 3).reshape(n1 * o1, n1 * o1)
    elif gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) or an (N, N, O, O) kernel; got shape {gram.shape}. "
                         "Pass K(X, X) on the training set (use kernel_predict for cross kernels).")
    gram = gram.astype(_dt())
    code = _finite_code(gram, name)
    code = jnp.maximum(code, _symmetric_code(jnp.where(code == _OK, gram, 0.0), name, tol))
    return 0.5 * (gram + gram.T), code


def _rhs(y, n, name) -> tuple[Array, Callable[[Array], Array], Array]:
    """targets → (n, k) matrix, a function mapping (..., n, k) back to (..., *y.shape), and the input's status
    code (concrete targets with NaN/inf are refused here)."""
    y = jnp.asarray(y)
    shape = y.shape
    if y.ndim == 1 and shape[0] == n:
        mat = y[:, None]
    elif y.ndim == 2 and shape[0] == n:
        mat = y
    elif y.ndim == 2 and shape[0] * shape[1] == n:
        mat = y.reshape(n, 1)
    else:
        raise ValueError(f"{name} has shape {shape}, which does not fit a kernel of size n={n}: pass ({n},), "
                         f"({n}, O) for a kernel shared by O outputs, or (N, O) with N·O = {n}.")
    mat = mat.astype(_dt())
    return mat, lambda m: m.reshape(m.shape[:-2] + shape), _finite_code(mat, name)


def _ridge_abs(gram_nn, ridge, ridge_scale, name="ridge"):
    """Absolute ridge λ and the unit (trace(K)/n for "trace", 1 for "absolute")."""
    if ridge_scale not in ("absolute", "trace"):
        raise ValueError(f"ridge_scale={ridge_scale!r}; use 'absolute' (λ in units of K) or 'trace' "
                         "(λ · trace(K)/n).")
    value = _concrete(ridge)
    if value is not None and not np.all(np.isfinite(value) & (value >= 0)):
        raise ValueError(f"{name}={value} must be finite and ≥ 0 (λ is the strength of (λ/2)‖θ−θ0‖²); use 0 "
                         "for interpolation or a positive value.")
    mean_eig = jnp.trace(gram_nn) / gram_nn.shape[0]
    unit = mean_eig if ridge_scale == "trace" else jnp.ones((), gram_nn.dtype)
    return jnp.asarray(ridge, gram_nn.dtype) * unit, unit, mean_eig


def _is_zero_kernel(min_eig, mean_eig) -> bool:
    """K = 0: no negative eigenvalue and a zero trace."""
    return float(mean_eig) == 0.0 and not float(min_eig) < 0.0


def _suggest(min_eig, mean_eig, ridge_scale: str) -> tuple[float, str]:
    """(ridge, ridge_scale) that makes K + λI safely positive definite, to pass back as they are: 2|μ_min| or a
    small multiple of the mean eigenvalue (never a denormal); "absolute" where trace units cannot express it
    (a zero or negative trace); ridge 1 absolute for a zero kernel (any positive ridge solves it)."""
    min_eig, mean_eig = float(min_eig), float(mean_eig)
    if _is_zero_kernel(min_eig, mean_eig):
        return 1.0, "absolute"
    floor = max(1e-8, 100 * float(jnp.finfo(_dt()).eps))  # relative to the mean eigenvalue
    absolute = max(2.0 * max(-min_eig, 0.0), floor * abs(mean_eig))
    if ridge_scale == "trace" and mean_eig > 0:
        return absolute / mean_eig, "trace"
    return absolute, "absolute"


_ZERO_KERNEL = ("the kernel K is zero: nothing to regress on (K(x, X) α = 0, so the predictions stay f0 for "
                "every ridge); check that the trainable parameters reach the outputs.")


def _input_message(status: str) -> str:
    """The message of a status set by traced inputs that could not be refused."""
    if status == "not_finite":
        return ("not_finite: the kernel, the targets or the matvec's output hold NaN or inf (inputs were traced, "
                "so they could not be refused); find where they come from and pass finite values.")
    return ("not_symmetric: ‖K − Kᵀ‖_F/‖K‖_F is above the rounding tolerance (inputs were traced, so they could "
            "not be refused); pass (K + K.T)/2 if that is intended, or use jaxlin.spectrum.sign_kernel_stats "
            "for an asymmetric kernel.")


@pytree_dataclass(["value", "ridge", "ridge_unit", "min_eig", "mean_eig", "status_code"], ["ridge_scale"])
class KRRSolution:
    """value: dual α = (K + λI)⁻¹Y in the shape of the targets; ridge: the absolute λ used;
    min_eig: smallest eigenvalue of K (computed only when the Cholesky failed, else NaN)."""
    value: Array
    ridge: Array
    ridge_unit: Array
    min_eig: Array
    mean_eig: Array
    status_code: Array
    ridge_scale: str = "absolute"

    @property
    def status(self) -> str:
        return STATUSES[int(self.status_code)]

    @property
    def suggested_ridge(self) -> float:
        """A ridge that makes K + λI positive definite, in the units of `suggested_ridge_scale`: pass both back."""
        if self.status == "ok":
            return float(self.ridge / self.ridge_unit)
        return self._suggestion()[0]

    @property
    def suggested_ridge_scale(self) -> str:
        """The ridge_scale `suggested_ridge` is in (the one used, unless it cannot express the suggestion)."""
        return self.ridge_scale if self.status == "ok" else self._suggestion()[1]

    def _suggestion(self) -> tuple[float, str]:
        if self.status != "not_psd":
            raise ValueError(f"no ridge helps: {self.message}")
        return _suggest(self.min_eig, self.mean_eig, self.ridge_scale)

    @property
    def message(self) -> str:
        if self.status == "ok":
            return f"ok: solved (K + λI)α = Y by Cholesky at λ = {float(self.ridge):.4g} (absolute)."
        if self.status != "not_psd":
            return _input_message(self.status)
        ridge, scale = self._suggestion()
        if _is_zero_kernel(self.min_eig, self.mean_eig):
            return (f"not_psd: {_ZERO_KERNEL} K + λI is singular at λ = {float(self.ridge):.4g} (absolute); "
                    f"ridge={ridge:g} with ridge_scale={scale!r} solves it.")
        return (f"not_psd: K + λI is not positive definite at λ = {float(self.ridge):.4g} (absolute); the "
                f"smallest eigenvalue of K is {float(self.min_eig):.4g}, so λ must exceed "
                f"{max(-float(self.min_eig), 0.0):.4g}. Try ridge={ridge:.4g} (ridge_scale={scale!r}), or check "
                "K is a symmetric PSD Gram J Jᵀ (float32 accumulation can give small negative eigenvalues).")


def kernel_ridge(gram, targets, ridge, *, ridge_scale: str = "absolute") -> KRRSolution:
    """Dual coefficients α = (K + λI)⁻¹ Y by Cholesky. Check `.status` ("ok"/"not_psd") and `.message`."""
    gram_nn, gram_code = _gram_matrix(gram)
    y_nk, unflatten, y_code = _rhs(targets, gram_nn.shape[0], "targets")
    lam, unit, mean_eig = _ridge_abs(gram_nn, ridge, ridge_scale)
    if lam.ndim != 0:
        raise ValueError(f"ridge must be a scalar; got shape {lam.shape}. Use ridge_path for a grid of ridges.")
    chol = jnp.linalg.cholesky(gram_nn + lam * jnp.eye(gram_nn.shape[0], dtype=gram_nn.dtype))
    ok = jnp.all(jnp.isfinite(chol))
    alpha = jax.scipy.linalg.cho_solve((chol, True), y_nk)
    min_eig = jax.lax.cond(ok, lambda g: jnp.full((), jnp.nan, g.dtype), lambda g: jnp.linalg.eigvalsh(g)[0], gram_nn)
    code = jnp.maximum(jnp.maximum(gram_code, y_code), jnp.where(ok, _OK, _NOT_PSD))
    return KRRSolution(unflatten(alpha), lam, unit, min_eig, mean_eig, code.astype(jnp.int32), ridge_scale)


def kernel_predict(gram_eval_train, dual, f0_eval=None) -> Array:
    """Predictions f0(X_eval) + K(X_eval, X) α for a cross kernel (M, N) or (M, N, O, O).

    dual: α as returned by kernel_ridge ((N,), (N, O) or (N·O,) for the 4-D kernel). For a 2-D (M·O, N·O)
    kernel and α of shape (N, O) the result is (M, O). f0_eval (optional) must have the result's shape.
    """
    g, a = jnp.asarray(gram_eval_train), jnp.asarray(dual)
    dt = jnp.result_type(g.dtype, a.dtype)
    g, a = g.astype(dt), a.astype(dt)
    _finite_code(g, "gram_eval_train")  # refuses a concrete cross kernel with NaN/inf (traced: unchecked)
    if g.ndim == 4:
        m, n, o1, o2 = g.shape
        if o1 != o2 or a.size != n * o2:
            raise ValueError(f"cross kernel {g.shape} and dual {a.shape} do not fit: expected an (M, N, O, O) "
                             f"kernel and a dual of N·O = {n * o2} entries.")
        out = jnp.einsum("mnab,nb->ma", g, a.reshape(n, o2))
    elif g.ndim == 2 and a.shape[:1] == g.shape[1:]:
        out = g @ a
    elif g.ndim == 2 and a.ndim == 2 and a.size == g.shape[1] and g.shape[0] % a.shape[1] == 0:
        out = (g @ a.reshape(-1)).reshape(-1, a.shape[1])
    else:
        raise ValueError(f"cross kernel {g.shape} and dual {a.shape} do not fit: pass K(X_eval, X) of shape "
                         "(M, N) or (M, N, O, O) with N matching the dual's leading axis.")
    if f0_eval is not None:
        f0 = jnp.asarray(f0_eval)
        _finite_code(f0, "f0_eval")
        if f0.shape != out.shape:
            raise ValueError(f"f0_eval has shape {f0.shape} but the predictions have shape {out.shape}.")
        out = out + f0
    return out


@pytree_dataclass(["ridges", "eigvals", "dual", "train_change", "train_resid", "objective", "delta_sq_norm",
                   "delta_norm", "status_code"], ["ridge_scale"])
class RidgePath:
    """Every quantity of §4.2 for K ridges (leading axis K), from one eigendecomposition K = U diag(μ) Uᵀ.

    ridges: absolute λ_k; dual: α_k = (K + λ_k I)⁻¹ r0; train_change: K α_k = f̄*(X) − f0(X) (add f0(X) for
    predictions, see train_predictions); train_resid: Y − f̄*(X) = λ_k α_k; objective: ½λ_k r0ᵀ(K+λ_k I)⁻¹r0;
    delta_sq_norm: ‖δ*‖² = r0ᵀK(K+λ_k I)⁻²r0; status_code per ridge (not_psd where μ_min + λ_k ≤ 0).
    """
    ridges: Array
    eigvals: Array
    dual: Array
    train_change: Array
    train_resid: Array
    objective: Array
    delta_sq_norm: Array
    delta_norm: Array
    status_code: Array
    ridge_scale: str = "absolute"

    def train_predictions(self, f0_train) -> Array:
        return jnp.asarray(f0_train) + self.train_change

    def predict(self, gram_eval_train, f0_eval=None) -> Array:
        return ridge_path_predict(gram_eval_train, self, f0_eval)

    @property
    def status(self) -> str:
        return STATUSES[int(np.max(np.asarray(self.status_code)))]

    @property
    def message(self) -> str:
        bad = np.flatnonzero(np.asarray(self.status_code) != _OK)
        if bad.size == 0:
            return f"ok: {len(self.ridges)} ridges solved from one eigh."
        if self.status != "not_psd":
            return _input_message(self.status)
        mu_min, mu_mean = float(np.min(self.eigvals)), float(np.mean(self.eigvals))
        ridge, scale = _suggest(mu_min, mu_mean, self.ridge_scale)
        where = f"K + λI is singular or indefinite for ridges {np.asarray(self.ridges)[bad]} (absolute)"
        if _is_zero_kernel(mu_min, mu_mean):
            return f"not_psd: {_ZERO_KERNEL} {where}; ridge={ridge:g} with ridge_scale={scale!r} solves it."
        return (f"not_psd: {where}; the smallest eigenvalue of K is {mu_min:.4g}, so use absolute ridges above "
                f"{max(-mu_min, 0.0):.4g} (e.g. ridge={ridge:.4g} with ridge_scale={scale!r}); those entries are "
                "inf/nan.")


def ridge_path(gram, resid0, ridges, *, ridge_scale: str = "absolute") -> RidgePath:
    """KRR for every ridge of a 1-D grid from ONE `eigh` of K. resid0 = Y − f0(X); see RidgePath."""
    gram_nn, gram_code = _gram_matrix(gram)
    r_nk, unflatten, r_code = _rhs(resid0, gram_nn.shape[0], "resid0")
    lam, _, _ = _ridge_abs(gram_nn, ridges, ridge_scale, "ridges")
    if lam.ndim != 1:
        raise ValueError(f"ridges must be a 1-D grid; got shape {lam.shape}. Use kernel_ridge for one ridge.")
    mu, u = jnp.linalg.eigh(gram_nn)
    c = u.T @ r_nk                                   # r0 in the eigenbasis, (n, k)
    shifted = mu[None, :] + lam[:, None]             # μ_i + λ_k, (K, n)
    inv = 1.0 / shifted
    c2 = jnp.sum(c * c, axis=1)                      # (n,)
    dual = jnp.einsum("ij,kj,jc->kic", u, inv, c)
    change = jnp.einsum("ij,kj,jc->kic", u, mu * inv, c)
    dsq = jnp.sum(mu * c2 * inv * inv, axis=1)
    return RidgePath(lam, mu, unflatten(dual), unflatten(change), unflatten(lam[:, None, None] * dual),
                     0.5 * lam * jnp.sum(c2 * inv, axis=1), dsq, jnp.sqrt(jnp.maximum(dsq, 0.0)),
                     jnp.maximum(jnp.maximum(gram_code, r_code), jnp.where(jnp.min(shifted, axis=1) > 0, _OK, _NOT_PSD)
                                 ).astype(jnp.int32), ridge_scale)


def ridge_path_predict(gram_eval_train, path: RidgePath, f0_eval=None) -> Array:
    """f0(X_eval) + K(X_eval, X) α_k for every ridge of the path; leading axis K."""
    return jax.vmap(lambda a: kernel_predict(gram_eval_train, a, f0_eval))(path.dual)


@pytree_dataclass(["value", "ridge", "iterations", "residual", "recursive_residual", "tol", "status_code"],
                  ["max_iters"])
class CGSolution:
    """value: x with (K + λI)x ≈ rhs; residual: true relative residual ‖rhs − (K+λI)x‖/‖rhs‖. `operator` names the
    system's matrix in the message (a subclass that solves another one, as `jaxlin.primal`'s JᵀJ + λI, says so)."""
    operator = "K+λI"  # a class attribute, not a field: the message's name of the matrix CG solved
    value: Array
    ridge: Array
    iterations: Array
    residual: Array
    recursive_residual: Array
    tol: Array
    status_code: Array
    max_iters: int = 0

    @property
    def status(self) -> str:
        return STATUSES[int(self.status_code)]

    @property
    def message(self) -> str:
        it, res, tol = int(self.iterations), float(self.residual), float(self.tol)
        if self.status == "ok":
            return f"ok: CG converged in {it} iterations, relative residual {res:.3g} ≤ tol {tol:.3g}."
        if self.status == "not_finite":
            return _input_message(self.status)
        if self.status == "not_psd":
            return (f"not_psd: CG broke down after {it} iterations (pᵀ({self.operator})p ≤ 0): the matvec is not "
                    f"symmetric positive definite at λ = {float(self.ridge):.4g}; increase the ridge or check the "
                    "matvec.")
        if float(self.recursive_residual) <= tol:
            return (f"not_converged: CG's recursive residual reached tol {tol:.3g} after {it} iterations but the "
                    f"true residual is {res:.3g}: a precision limit; loosen tol, enable x64, or raise the ridge.")
        return (f"not_converged: CG stopped after {it} iterations (max_iters={self.max_iters}) with relative "
                f"residual {res:.3g} > tol {tol:.3g}. Try max_iters={2 * max(it, 1)} or more, a larger ridge "
                f"(CG needs about √κ({self.operator}) iterations), or a looser tol.")


def conjugate_gradient(matvec: Callable[[Array], Array], rhs, ridge, *, tol=1e-6, max_iters: int | None = None,
                       x0=None) -> CGSolution:
    """Solve (K + λI)x = rhs by CG when only v ↦ K v is available (e.g. NTK-vector products J(Jᵀv)).

    tol is relative: stop when ‖r‖ ≤ tol·‖rhs‖. max_iters (static) defaults to 2·rhs.size. λ is absolute.
    jit-able; returns iterations, the recursive and the recomputed true residual, and a status.
    """
    dt = _dt()
    b = jnp.asarray(rhs).astype(dt)
    n_iters = 2 * b.size if max_iters is None else max_iters
    if not isinstance(n_iters, (int, np.integer)) or n_iters < 0:
        raise ValueError(f"max_iters={max_iters!r} must be a non-negative Python int (it is static under jit).")
    tol_c = _concrete(tol)
    if tol_c is not None and not tol_c > 0:
        raise ValueError(f"tol={tol} must be > 0 (a relative residual, e.g. 1e-6; 1e-10 needs x64).")
    lam_c = _concrete(ridge)
    if lam_c is not None and not np.all(lam_c >= 0):
        raise ValueError(f"ridge={lam_c} must be ≥ 0 (absolute, in the units of K).")
    lam, tol = jnp.asarray(ridge, dt), jnp.asarray(tol, dt)
    if x0 is not None and jnp.shape(x0) != b.shape:
        raise ValueError(f"x0 has shape {jnp.shape(x0)} but rhs has shape {b.shape}.")
    input_code = _finite_code(b, "rhs")
    if x0 is not None:
        input_code = jnp.maximum(input_code, _finite_code(jnp.asarray(x0).astype(dt), "x0"))

    def op(v):
        return jnp.asarray(matvec(v)).astype(dt) + lam * v

    dot = lambda a, c: jnp.sum(a * c)
    x = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0).astype(dt)
    r = b - op(x)
    bnorm = jnp.sqrt(dot(b, b))
    scale = jnp.where(bnorm > 0, bnorm, 1.0)
    thresh = (tol * scale) ** 2

    def cond(s):
        _, _, _, rs, k, broke = s
        return (rs > thresh) & (k < n_iters) & ~broke

    def body(s):
        x, r, p, rs, k, _ = s
        ap = op(p)
        pap = dot(p, ap)
        broke = ~(pap > 0)
        alpha = jnp.where(broke, 0.0, rs / jnp.where(broke, 1.0, pap))
        x, r = x + alpha * p, r - alpha * ap
        rs_new = dot(r, r)
        p = r + (rs_new / rs) * p
        return x, r, p, rs_new, k + 1, broke

    rs0 = dot(r, r)
    x, r, _, rs, k, broke = jax.lax.while_loop(cond, body, (x, r, r, rs0, jnp.zeros((), jnp.int32), jnp.array(False)))
    res = jnp.sqrt(dot(b - op(x), b - op(x))) / scale
    code = jnp.where(broke, _NOT_PSD, jnp.where(res <= tol, _OK, _NOT_CONVERGED))
    code = jnp.where(jnp.isfinite(res), jnp.maximum(input_code, code), _NOT_FINITE).astype(jnp.int32)
    return CGSolution(x, lam, k, res, jnp.sqrt(rs) / scale, tol, code, int(n_iters))


@pytree_dataclass(["times", "change", "resid", "loss", "delta_sq_norm", "objective", "ridge", "learning_rate",
                   "max_stable_learning_rate", "status_code"], ["kind"])
class Dynamics:
    """Training-set trajectory at the requested times (leading axis T).

    change: u_t = J δ_t (the change of the training outputs); resid: r0 − u_t = Y − f_t(X);
    loss: ½‖r0 − u_t‖²; delta_sq_norm: ‖δ_t‖²; objective: loss + (λ/2)‖δ_t‖²; times: steps (GD) or η·steps (flow).
    """
    times: Array
    change: Array
    resid: Array
    loss: Array
    delta_sq_norm: Array
    objective: Array
    ridge: Array
    learning_rate: Array
    max_stable_learning_rate: Array
    status_code: Array
    kind: str = "gd"

    @property
    def status(self) -> str:
        return STATUSES[int(self.status_code)]

    @property
    def message(self) -> str:
        bound = float(self.max_stable_learning_rate)
        if self.status in ("not_finite", "not_symmetric"):
            return _input_message(self.status)
        if self.status == "ok":
            return f"ok: {self.kind} dynamics; stable for learning rates below 2/(μ_max+λ) = {bound:.4g}."
        return (f"unstable: learning_rate {float(self.learning_rate):.4g} is not in (0, 2/(μ_max+λ)) = (0, {bound:.4g})"
                f" (or K + λI has a negative eigenvalue), so GD diverges; use e.g. {bound / 2:.4g} = 1/(μ_max+λ).")


def _modes(gram, resid0, ridge, ridge_scale):
    gram_nn, gram_code = _gram_matrix(gram)
    r_nk, unflatten, r_code = _rhs(resid0, gram_nn.shape[0], "resid0")
    lam, _, _ = _ridge_abs(gram_nn, ridge, ridge_scale)
    if lam.ndim != 0:
        raise ValueError(f"ridge must be a scalar; got shape {lam.shape}.")
    mu, u = jnp.linalg.eigh(gram_nn)
    return mu, u, u.T @ r_nk, r_nk, lam, unflatten, jnp.maximum(gram_code, r_code)


def _trajectory(mu, u, c, r_nk, lam, unflatten, input_code, fitted, times, eta, kind):
    """fitted (T, n): the fraction 1 − decay of mode i reached at each time."""
    shifted = mu + lam
    safe = jnp.where(shifted == 0, 1.0, shifted)
    gain = jnp.where(shifted == 0, 0.0, mu / safe)           # μ_i / (μ_i + λ)
    coef = gain[None, :, None] * c[None] * fitted[:, :, None]  # u_t in the eigenbasis, (T, n, k)
    change = jnp.einsum("ij,tjc->tic", u, coef)
    resid = r_nk[None] - change
    loss = 0.5 * jnp.sum((c[None] - coef) ** 2, axis=(1, 2))
    c2 = jnp.sum(c * c, axis=1)
    dsq = jnp.sum(jnp.where(shifted == 0, 0.0, mu * c2 / safe**2)[None] * fitted**2, axis=1)
    bound = 2.0 / (mu[-1] + lam)
    unstable = jnp.min(shifted) < 0
    if kind == "gd":
        unstable = unstable | ~((eta > 0) & (eta < bound))
    return Dynamics(times, unflatten(change), unflatten(resid), loss, dsq, loss + 0.5 * lam * dsq, lam,
                    jnp.asarray(eta, mu.dtype), bound,
                    jnp.maximum(input_code, jnp.where(unstable, _UNSTABLE, _OK)).astype(jnp.int32), kind)


def _times(t, name, integer):
    arr = jnp.atleast_1d(jnp.asarray(t))
    val = _concrete(arr)
    if arr.ndim != 1 or (integer and not jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a scalar or 1-D array of {'integers' if integer else 'times'}; "
                         f"got dtype {arr.dtype}, shape {arr.shape}.")
    if val is not None and not np.all(val >= 0):
        raise ValueError(f"{name}={val} must be ≥ 0.")
    return arr


def gd_dynamics(gram, resid0, ridge, learning_rate, steps, *, ridge_scale: str = "absolute") -> Dynamics:
    """Closed-form GD on δ, δ ← δ − η[Jᵀ(Jδ − r0) + λδ] from δ0 = 0, at integer `steps`:

        u_t = Σ_i (μ_i/(μ_i+λ)) ⟨v_i, r0⟩ [1 − (1 − η(μ_i+λ))^t] v_i,   (K = Σ μ_i v_i v_iᵀ)

    status "unstable" unless 0 < η < 2/(μ_max+λ).
    """
    mu, u, c, r_nk, lam, unflatten, input_code = _modes(gram, resid0, ridge, ridge_scale)
    steps = _times(steps, "steps", integer=True)
    eta = jnp.asarray(learning_rate, mu.dtype)
    step = eta * (mu + lam)[None, :]
    rho = 1.0 - step
    t = steps[:, None].astype(mu.dtype)
    pos = rho > 0
    fit_pos = -jnp.expm1(t * jnp.log1p(-jnp.where(pos, step, 0.0)))   # 1 − ρ^t, accurate for small ηa
    sign = jnp.where((steps[:, None] % 2 == 1) & ~pos, -1.0, 1.0)
    fitted = jnp.where(pos, fit_pos, 1.0 - sign * jnp.abs(rho) ** t)
    return _trajectory(mu, u, c, r_nk, lam, unflatten, input_code, fitted, steps, eta, "gd")


def flow_dynamics(gram, resid0, ridge, times, *, ridge_scale: str = "absolute") -> Dynamics:
    """Gradient flow dδ/dt = −[Jᵀ(Jδ − r0) + λδ], δ(0) = 0: u_i(t) = (μ_i/(μ_i+λ)) r0_i (1 − e^{−(μ_i+λ)t}).

    `times` are in units of η·steps (GD with learning rate η for t/η steps approaches the flow at time t).
    """
    mu, u, c, r_nk, lam, unflatten, input_code = _modes(gram, resid0, ridge, ridge_scale)
    times = _times(times, "times", integer=False).astype(mu.dtype)
    fitted = -jnp.expm1(-times[:, None] * (mu + lam)[None, :])
    return _trajectory(mu, u, c, r_nk, lam, unflatten, input_code, fitted, times, jnp.nan, "flow")


def stable_learning_rate(gram, ridge, *, ridge_scale: str = "absolute") -> Array:
    """The bound 2/(μ_max + λ): GD on δ converges iff 0 < η < it (1/(μ_max+λ) is the usual safe choice)."""
    gram_nn, _ = _gram_matrix(gram)  # traced bad input: a NaN or meaningless bound, no status to carry it
    lam, _, _ = _ridge_abs(gram_nn, ridge, ridge_scale)
    return 2.0 / (jnp.linalg.eigvalsh(gram_nn)[-1] + lam)


def check_learning_rate(gram, ridge, learning_rate, *, ridge_scale: str = "absolute") -> float:
    """Raise ValueError unless 0 < η < 2/(μ_max+λ); returns the bound. Eager only."""
    bound = float(stable_learning_rate(gram, ridge, ridge_scale=ridge_scale))
    if not 0 < float(learning_rate) < bound:
        raise ValueError(f"learning_rate={float(learning_rate):.4g} is outside the stable range (0, 2/(μ_max+λ)) = "
                         f"(0, {bound:.4g}); GD on δ would diverge or stall. Use e.g. {bound / 2:.4g} = 1/(μ_max+λ).")
    return bound
