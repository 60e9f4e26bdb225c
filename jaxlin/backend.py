"""Is the active JAX backend computing what jaxlin relies on? A self-check of a few milliseconds.

XLA:CPU in jaxlib 0.10.2 (and only that release) compiles a broadcast-multiply-reduce-add,
``c + (x * c).sum(-1, keepdims=True)`` broadcast over a leading axis, into one fused reduction that reuses the
first slice's sum for every other slice once a slice holds more than 16,384 float32 elements. A LayerNorm
backward vmapped over output cotangents is that pattern, so per-example kernels of real models came out wrong
without any error. ``check_backend`` runs small canaries of the patterns jaxlin depends on against float64
NumPy answers; ``jaxlin run`` calls ``require_healthy_backend`` before computing anything. See
``docs/backend.md`` for the fault, the affected versions and the two fixes.

>>> check = jaxlin.check_backend()
>>> check.passed, check.canaries["broadcast_reduce"]["relative_error"]   # (True, 6e-08)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

# Relative error (max |computed − reference| / max |reference|) a canary may show in its dtype: the computations
# are a few float additions deep, so a healthy backend is near the dtype's epsilon; the 0.10.2 fault is ≥ 10 %.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
FIXES = ("install a jaxlib other than 0.10.2 (scripts/setup.sh pins jax>=0.10,!=0.10.2: 0.10.1 on Python 3.11, "
         "0.11/0.12 on Python 3.12+), or set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce before "
         "starting Python")


class BackendError(RuntimeError):
    """The active backend computed a canary wrongly; every number it produced would be suspect."""


# --------------------------------------------------------------------------------------------------- canaries
# A canary: inputs for a dtype, the computation in JAX, and its float64 NumPy reference from the same inputs.

# Sizes past the lines at which the 0.10.2 fusion goes wrong: 16,384 elements a slice for the broadcast reduce
# (320 × 64 = 20,480), 2,048 rows of width ≥ 16 for the layer-norm pullback (as batch 32 × 64 tokens is).
_ROWS, _WIDTH = 320, 64
_LN_ROWS, _LN_WIDTH = 2112, 48


@dataclasses.dataclass(frozen=True)
class Canary:
    inputs: Callable  # dtype -> tuple of arrays
    compute: Callable  # JAX: inputs -> array (traced, jitted together with the other canaries)
    reference: Callable  # NumPy float64: inputs -> array


def _normal(dtype, *shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _broadcast_inputs(dtype):
    return _normal(dtype, _ROWS, _WIDTH, seed=0), _normal(dtype, 2, _ROWS, _WIDTH, seed=1)


def _broadcast_reduce(x_RW, c_SRW):
    return c_SRW + (x_RW * c_SRW).sum(-1, keepdims=True)


def _layer_norm_inputs(dtype):  # x, scale, and two cotangents / tangents (as for two outputs)
    return (_normal(dtype, _LN_ROWS, _LN_WIDTH, seed=2),
            (1.0 + 0.1 * _normal(dtype, _LN_WIDTH, seed=3)).astype(dtype), _normal(dtype, 2, _LN_ROWS, _LN_WIDTH, seed=4))


def _layer_norm(x, scale):
    import jax

    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale


def _layer_norm_jacobian_map(x, v):
    """NumPy float64: the Jacobian of the unscaled layer norm w.r.t. x (a symmetric matrix) applied to v."""
    mean = x.mean(-1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (x - mean) / std
    return (v - v.mean(-1, keepdims=True) - xhat * (v * xhat).mean(-1, keepdims=True)) / std


def _vmapped_vjp(x, scale, ct_SRW):
    import jax

    _, pull = jax.vjp(lambda x: _layer_norm(x, scale), x)
    return jax.vmap(lambda c: pull(c)[0])(ct_SRW)


def _vmapped_jvp(x, scale, t_SRW):
    import jax

    return jax.vmap(lambda t: jax.jvp(lambda x: _layer_norm(x, scale), (x,), (t,))[1])(t_SRW)


CANARIES: dict[str, Canary] = {
    "broadcast_reduce": Canary(_broadcast_inputs, _broadcast_reduce, _broadcast_reduce),
    "vmapped_layer_norm_vjp": Canary(_layer_norm_inputs, _vmapped_vjp,
                                     lambda x, s, ct: _layer_norm_jacobian_map(x, ct * s)),
    "vmapped_layer_norm_jvp": Canary(_layer_norm_inputs, _vmapped_jvp,
                                     lambda x, s, t: _layer_norm_jacobian_map(x, t) * s),
}


def _run_canaries(dtype: str) -> dict[str, float]:
    """Relative error of each canary in `dtype`; all canaries run in one jitted program (one compile)."""
    import jax

    inputs = {name: c.inputs(np.dtype(dtype)) for name, c in CANARIES.items()}
    got = jax.jit(lambda ins: {name: CANARIES[name].compute(*a) for name, a in ins.items()})(inputs)
    return {name: _relative_error(np.asarray(got[name]),
                                  CANARIES[name].reference(*(a.astype(np.float64) for a in inputs[name])))
            for name in CANARIES}


# ------------------------------------------------------------------------------------------------------ check

@dataclasses.dataclass(frozen=True)
class BackendCheck:
    """What `check_backend` saw: a status, the versions, and each canary's relative error and tolerance."""

    passed: bool
    jax: str
    jaxlib: str
    backend: str
    device_kind: str
    canaries: dict  # "name/dtype" -> {"relative_error": float, "tolerance": float, "passed": bool}

    @property
    def status(self) -> str:
        return "ok" if self.passed else "failed"

    @property
    def message(self) -> str:
        if self.passed:
            return f"jax {self.jax} / jaxlib {self.jaxlib} on {self.backend} computed every canary correctly"
        bad = ", ".join(f"{name} off by {c['relative_error']:.2g} (tolerance {c['tolerance']:.0e})"
                        for name, c in self.canaries.items() if not c["passed"])
        return (f"the {self.backend} backend of jaxlib {self.jaxlib} computes wrong numbers ({bad}); "
                f"nothing computed on it can be trusted. Fix: {FIXES}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "jax": self.jax, "jaxlib": self.jaxlib,
                "backend": self.backend, "device_kind": self.device_kind, "canaries": self.canaries,
                "message": self.message}


def _relative_error(got, want) -> float:
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    return err / scale if scale > 0 else err


def _dtypes() -> tuple[str, ...]:
    import jax

    return ("float32", "float64") if jax.config.jax_enable_x64 else ("float32",)


def check_backend(dtypes: tuple[str, ...] | None = None) -> BackendCheck:
    """Run every canary on the default backend in each dtype (float32, and float64 when x64 is enabled).

    Cached per backend and dtypes: the first call compiles three tiny programs (well under a second), later
    calls are free. Never raises for a wrong answer: read ``.passed`` / ``.message``, or call
    `require_healthy_backend`.
    """
    import jax

    dtypes = tuple(dtypes) if dtypes is not None else _dtypes()
    unknown = [d for d in dtypes if d not in TOLERANCE]
    if unknown:
        raise ValueError(f"dtypes={unknown!r} cannot be checked; valid: {sorted(TOLERANCE)}")
    return _check(jax.default_backend(), dtypes)


@functools.lru_cache(maxsize=None)
def _check(backend: str, dtypes: tuple[str, ...]) -> BackendCheck:
    import jax
    import jaxlib

    canaries = {}
    for dtype in dtypes:
        for name, err in _run_canaries(dtype).items():
            ok = bool(np.isfinite(err) and err <= TOLERANCE[dtype])
            canaries[f"{name}/{dtype}"] = {"relative_error": err, "tolerance": TOLERANCE[dtype], "passed": ok}
    return BackendCheck(passed=all(c["passed"] for c in canaries.values()), jax=jax.__version__,
                        jaxlib=jaxlib.__version__, backend=backend, device_kind=jax.devices()[0].device_kind,
                        canaries=canaries)


def require_healthy_backend(dtypes: tuple[str, ...] | None = None) -> BackendCheck:
    """`check_backend`, raising `BackendError` (its message names the jaxlib version and both fixes) on failure."""
    check = check_backend(dtypes)
    if not check.passed:
        raise BackendError(check.message)
    return check
