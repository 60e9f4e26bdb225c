"""Exact empirical NTKs of any `f(params, x)`, modelled on neural-tangents' `empirical_ntk_fn`.

`f(params, x)`: params any pytree, x a pytree of arrays with a leading example axis (e.g.
{"input_ids": (N, L), "attention_mask": (N, L)}), output one array (N, S...) (for jaxlin (N, O) or (N,)).

    K(x1, x2)[a, b, ...] = Σ_θ ∂f(x1_a)/∂θ · ∂f(x2_b)/∂θ   (= J1 J2ᵀ)

Output shape: (N1, N2) followed by each kept (not traced) output axis twice, interleaved as in NT:
(N1, N2, O, O) for outputs (N, O) with `trace_axes=()`, (N1, N2) with the default `trace_axes=(-1,)`.
**Traced axes are summed** (Σ_o J1[a,o]·J2[b,o]); neural-tangents averages them: `reduce="mean"` gives
NT's convention.

Implementations (all exact):
- "jacobian_contraction": per-example Jacobians (`jacrev_per_output` vmapped over examples, or `jacfwd` when the per-example
  output is larger than P), contracted leaf by leaf and summed over leaves.
- "ntk_vector_products": never materialises J: columns of K are jvps of f(·, x1) along the vjps of
  f(·, x2_b) for each basis cotangent (the vjps by `map_over_outputs`, the jvps vmapped), and over x2.
- "structured": a hook for jaxlin models (per-module / LoRA kernels): `jaxlin.module_ntk` registers its
  builder with `register_implementation`. For arbitrary f it raises: use `jaxlin.module_ntks`.
- "neural_tangents": NT's own jacobian contraction via `jaxlin._nt_compat` (optional; imported lazily).
- "auto": chosen from shapes only (`choose_implementation`), never by compiling candidates.

`kernel="sign"` (jacobian_contraction only) gives the asymmetric SignGD kernel J1 · s(J2)ᵀ with
s(z) = z/(|z|+1e-8), the kernel the paper's published code computes (docs/paper.md §5.2); it is not
symmetric, so use singular values (or symmetrize) downstream.

`empirical_ntk_fn` returns a pure, un-jitted `ntk(x1, x2, params)`; jit it once where you call it, or
hand it to `gram.blocked_gram(ntk, x1, x2, args=(params,), ...)` which jits it once per tile shape.
"""
from __future__ import annotations

import dataclasses
import math
import os
import string
from typing import Any, Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import gram as _gram
from jaxlin._types import PyTree
from jaxlin._util import leading_size, per_example

SIGN_EPS = 1e-8
KERNELS = ("ntk", "sign")
REDUCES = ("sum", "mean")
VMAP_AXES = (0, None)
AUTO_JACOBIAN_BYTES = 2 * 1024**3  # "auto" never picks jacobian_contraction above this J size


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything an implementation builder needs besides `f` (validated by `empirical_ntk_fn`)."""

    trace_axes: tuple[int, ...]  # per-example output axes (full-output axis − 1), sorted
    vmap_axes: Optional[int]
    reduce: str
    accumulate_dtype: Any
    kernel: str


# ----------------------------------------------------------------------------------------------- shapes
def _normalize_trace_axes(trace_axes: Sequence[int], out_ndim: int) -> tuple[int, ...]:
    """Map trace_axes (axes of the full output (N, S...)) to sorted per-example axes 0..d-1."""
    valid = list(range(1, out_ndim)) + list(range(-out_ndim + 1, 0))
    norm = []
    for ax in tuple(trace_axes):
        if not isinstance(ax, (int, np.integer)) or ax not in valid:
            raise ValueError(f"bad trace_axes={tuple(trace_axes)}: {ax!r} is not an output axis other than "
                             f"the example axis 0 of an output with {out_ndim} dims; valid axes: {valid}.")
        norm.append(int(ax) % out_ndim - 1)
    if len(set(norm)) != len(norm):
        raise ValueError(f"trace_axes={tuple(trace_axes)} names an axis twice.")
    return tuple(sorted(norm))


def _subscripts(d: int, traced: tuple[int, ...]):
    """Per-example subscripts of the two sides' output axes and the interleaved kept output axes."""
    letters = iter(string.ascii_letters[2:])  # 'a', 'b' are the example axes
    s1, s2, kept = "", "", ""
    for i in range(d):
        if i in traced:
            t = next(letters)
            s1, s2 = s1 + t, s2 + t
        else:
            k, l = next(letters), next(letters)
            s1, s2, kept = s1 + k, s2 + l, kept + k + l
    return s1, s2, kept


def _out_shape(f, params, x):
    out = jax.eval_shape(f, params, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"f(params, x) must return one array (N, ...); got a pytree {out}.")
    return out


# ------------------------------------------------------------------------------------- implementations
def map_over_outputs(fn, cotangents):
    """``fn`` applied to each cotangent along the leading axis of `cotangents` (one per output entry), stacked:
    how every reverse-mode Jacobian in jaxlin takes its pullbacks, so the choice lives in one place.

    ``jax.lax.map``, not ``jax.vmap``: on the default (structured) kernel both take the same time, while the map
    compiles 2.6× faster and holds one output's cotangents at a time (benchmarks/bench_pullbacks.py,
    benchmarks/RESULTS.md); vmap is 1.3× faster only for jacobian_contraction."""
    return jax.lax.map(fn, cotangents)


def jacrev_per_output(f):
    """``jax.jacrev(f)`` (reverse mode, leaves (*out_shape, *leaf_shape)), its pullbacks taken by
    `map_over_outputs`."""
    def jac(params, *args):
        out, pull = jax.vjp(lambda p: f(p, *args), params)
        basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
        rows = map_over_outputs(lambda e: pull(e)[0], basis)
        return jax.tree.map(lambda r: r.reshape(out.shape + r.shape[1:]), rows)

    return jac


def _jacobian(f, params, x, vmap_axes):
    """Jacobian leaves (N, S..., *leaf_shape): per example when vmap_axes=0, of the whole batch if None."""
    n_params = sum(p.size for p in jax.tree.leaves(params))
    if vmap_axes == 0:
        f_ex = per_example(f)
        out_size = math.prod(_out_shape(f, params, x).shape[1:])
        jac = jacrev_per_output if out_size <= n_params else jax.jacfwd
        return jax.vmap(lambda xi: jac(f_ex)(params, xi))(x)
    out_size = math.prod(_out_shape(f, params, x).shape)
    jac = jacrev_per_output if out_size <= n_params else jax.jacfwd
    return jac(f)(params, x)


def _finish(k, spec: KernelSpec, out_shape):
    if spec.reduce == "mean":
        k = k / math.prod(out_shape[1 + i] for i in spec.trace_axes)
    return k


def _jacobian_contraction(f, spec: KernelSpec):
    def ntk(x1, x2, params):
        out = _out_shape(f, params, x1)
        s1, s2, kept = _subscripts(out.ndim - 1, spec.trace_axes)
        jac1 = _jacobian(f, params, x1, spec.vmap_axes)
        jac2 = jac1 if x2 is None else _jacobian(f, params, x2, spec.vmap_axes)
        if spec.kernel == "sign":
            jac2 = jax.tree.map(lambda j: j / (jnp.abs(j) + SIGN_EPS), jac2)
        eq = f"a{s1}z,b{s2}z->ab{kept}"

        def contract(j1, j2):
            j1 = j1.reshape(j1.shape[:out.ndim] + (-1,))
            j2 = j2.reshape(j2.shape[:out.ndim] + (-1,))
            return jnp.einsum(eq, j1, j2, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=spec.accumulate_dtype)

        return _finish(sum(jax.tree.leaves(jax.tree.map(contract, jac1, jac2))), spec, out.shape)

    return ntk


def _ntk_vector_products(f, spec: KernelSpec):
    if spec.kernel != "ntk":
        raise ValueError(f"kernel={spec.kernel!r} is only defined with implementation='jacobian_contraction'.")

    def ntk(x1, x2, params):
        x2 = x1 if x2 is None else x2
        out1, out2 = _out_shape(f, params, x1), _out_shape(f, params, x2)
        d = out1.ndim - 1
        f1 = lambda p: f(p, x1)  # noqa: E731

        def columns(g_side, x_side, shape):  # K columns for every basis cotangent of g_side(·, x_side)
            basis = jnp.eye(math.prod(shape), dtype=out2.dtype).reshape((-1,) + shape)
            _, pull = jax.vjp(lambda p: g_side(p, x_side), params)
            tangents = map_over_outputs(lambda ct: pull(ct)[0], basis)
            cols = jax.vmap(lambda t: jax.jvp(f1, (params,), (t,))[1])(tangents)
            return cols.reshape(shape + out1.shape)

        if spec.vmap_axes == 0:
            cols = jax.vmap(lambda xj: columns(per_example(f), xj, out2.shape[1:]))(x2)
        else:
            cols = columns(f, x2, out2.shape)
        s1, s2, kept = _subscripts(d, spec.trace_axes)
        cols = cols.astype(spec.accumulate_dtype or cols.dtype)
        return _finish(jnp.einsum(f"b{s2}a{s1}->ab{kept}", cols), spec, out1.shape)

    return ntk


STRUCTURED_NEEDS_MODEL = ("implementation='structured' needs a jaxlin model's module structure and is not defined "
                          "for an arbitrary f; use jaxlin.module_ntks for jaxlin models, or implementation="
                          "'jacobian_contraction' / 'ntk_vector_products' here.")


def _structured(f, spec: KernelSpec):
    raise ValueError(STRUCTURED_NEEDS_MODEL)


def _neural_tangents(f, spec: KernelSpec):
    from jaxlin import _nt_compat  # only when asked

    if spec.kernel != "ntk":
        raise ValueError(f"kernel={spec.kernel!r} is only defined with implementation='jacobian_contraction'.")
    nt_fn = _nt_compat.nt_empirical_ntk_fn(f, trace_axes=tuple(a + 1 for a in spec.trace_axes),
                                          vmap_axes=spec.vmap_axes, reduce=spec.reduce)
    if spec.accumulate_dtype is None:
        return nt_fn
    return lambda x1, x2, params: nt_fn(x1, x2, params).astype(spec.accumulate_dtype)


def _auto(f, spec: KernelSpec):
    def ntk(x1, x2, params):
        name = choose_implementation(f, params, x1, x2, trace_axes=tuple(a + 1 for a in spec.trace_axes),
                                     vmap_axes=spec.vmap_axes)
        if spec.kernel == "sign":
            name = "jacobian_contraction"
        return _IMPLEMENTATIONS[name](f, spec)(x1, x2, params)
    return ntk


# name -> builder(f, KernelSpec) -> ntk(x1, x2, params); `register_implementation` replaces or adds one.
_IMPLEMENTATIONS: dict[str, Callable] = {
    "auto": _auto,
    "jacobian_contraction": _jacobian_contraction,
    "ntk_vector_products": _ntk_vector_products,
    "structured": _structured,
    "neural_tangents": _neural_tangents,
}


# ------------------------------------------------------------------------------------------- public API
def register_implementation(name: str, builder: Callable) -> None:
    """Make ``empirical_ntk_fn(f, implementation=name)`` use ``builder(f, spec: KernelSpec) -> ntk(x1, x2, params)``.

    For implementations that need more than `f` (e.g. "structured", which `jaxlin.module_ntk` registers for
    jaxlin models); registering an existing name replaces its builder."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"implementation name {name!r} must be a non-empty string other than 'auto'")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable as builder(f, spec) -> ntk(x1, x2, params)")
    _IMPLEMENTATIONS[name] = builder


def empirical_ntk_fn(f: Callable, *, trace_axes: Sequence[int] = (-1,), vmap_axes: Optional[int] = 0,
                     implementation: str = "auto", reduce: str = "sum", accumulate_dtype=None,
                     kernel: str = "ntk") -> Callable:
    """Return a pure `ntk(x1, x2, params)` computing the empirical NTK of `f` (see module docstring).

    Args:
      f: `f(params, x) -> (N, S...)`, x a pytree with a leading example axis.
      trace_axes: output axes (of the full output, example axis excluded) summed over; () keeps all.
      vmap_axes: 0 if f treats examples independently (per-example Jacobians); None if not (the Jacobian
        of the whole batch output is taken, e.g. for batch-norm-like models).
      implementation: one of `_IMPLEMENTATIONS` ("auto" rule: `choose_implementation`).
      reduce: "sum" (jaxlin) or "mean" (neural-tangents) over traced axes.
      accumulate_dtype: dtype of the contraction (e.g. jnp.float64 with x64); None keeps J's dtype.
      kernel: "ntk" (J1 J2ᵀ) or "sign" (J1 s(J2)ᵀ, jacobian_contraction/auto only).
    The returned `ntk` accepts x2=None (x2 = x1; jacobian_contraction then computes J once).
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation={implementation!r}; valid: {sorted(_IMPLEMENTATIONS)}.")
    if reduce not in REDUCES:
        raise ValueError(f"unknown reduce={reduce!r}; valid: {REDUCES}.")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel={kernel!r}; valid: {KERNELS}.")
    if kernel == "sign" and implementation not in ("auto", "jacobian_contraction"):
        raise ValueError(f"kernel='sign' is only defined with implementation='jacobian_contraction', "
                         f"got implementation={implementation!r}.")
    if vmap_axes not in VMAP_AXES:
        raise ValueError(f"vmap_axes={vmap_axes!r} is not supported; valid: {VMAP_AXES}.")
    trace_axes = tuple(trace_axes)
    builders = {}

    def ntk(x1, x2, params):
        n1 = leading_size(x1, "x1")
        if x2 is not None and jax.tree.structure(x2) != jax.tree.structure(x1):
            raise ValueError("x2 must have the pytree structure of x1 (or be None).")
        n2 = n1 if x2 is None else leading_size(x2, "x2")
        out = _out_shape(f, params, x1)
        spec = KernelSpec(_normalize_trace_axes(trace_axes, out.ndim), vmap_axes, reduce, accumulate_dtype, kernel)
        if spec not in builders:
            builders[spec] = _IMPLEMENTATIONS[implementation](f, spec)
        k = builders[spec](x1, x2, params)
        kept = [s for i, s in enumerate(out.shape[1:]) if i not in spec.trace_axes]
        # every implementation, a registered one included, returns the documented (N1, N2, kept axes twice)
        chex.assert_shape(k, (n1, n2) + tuple(s for s in kept for _ in range(2)))
        return k

    return ntk


def _tokensper_example(x) -> int:
    """Rough forward-cost multiplier from shapes: the per-example size of the largest integer input."""
    ints = [math.prod(np.shape(l)[1:]) for l in jax.tree.leaves(x) if jnp.issubdtype(l.dtype, jnp.integer)]
    return max(ints, default=1)


def choose_implementation(f, params, x1, x2=None, *, trace_axes=(-1,), vmap_axes=0,
                          max_jacobian_bytes: int = AUTO_JACOBIAN_BYTES) -> str:
    """The "auto" rule, from shapes only (jax.eval_shape; nothing is compiled).

    With P params, O = per-example output size, O_k = product of kept output axes, N1, N2 examples and
    F = 2·P·T FLOPs per example forward (T = tokens per example: the per-example size of the largest
    integer input leaf, else 1):
      jacobian_contraction ≈ 3F·O·(N1+N2) + 2P·N1·N2·O·O_k   (O reverse passes per example + contraction)
      ntk_vector_products  ≈ N2·O·(3F + 2F·N1)               (one vjp, then a jvp over x1, per column)
    Pick jacobian_contraction if its Jacobians, (N1+N2)·O·P·itemsize bytes, fit `max_jacobian_bytes`
    and its FLOPs are not larger; else ntk_vector_products.
    """
    out = _out_shape(f, params, x1)
    n1 = out.shape[0]
    n2 = n1 if x2 is None else leading_size(x2, "x2")
    per_ex = out.shape[1:]
    o = math.prod(per_ex)
    traced = _normalize_trace_axes(trace_axes, out.ndim)
    o_kept = math.prod(s for i, s in enumerate(per_ex) if i not in traced)
    p = sum(l.size for l in jax.tree.leaves(params))
    itemsize = max((np.dtype(l.dtype).itemsize for l in jax.tree.leaves(params)), default=4)
    fwd = 2 * p * _tokensper_example(x1)
    flops_jc = 3 * fwd * o * (n1 + n2) + 2 * p * n1 * n2 * o * o_kept
    flops_ntvp = n2 * o * (3 * fwd + 2 * fwd * n1)
    fits = (n1 + n2) * o * p * itemsize <= max_jacobian_bytes
    return "jacobian_contraction" if fits and flops_jc <= flops_ntvp else "ntk_vector_products"


def empirical_ntk(f, params, x1, x2=None, *, block_size=None, trace_axes=(-1,), vmap_axes=0,
                  implementation="auto", reduce="sum", kernel="ntk", accumulate_dtype=np.float64,
                  progress=False, checkpoint_dir=None, key="", mesh=None,
                  sharding: _gram.ShardingSpec = _gram.ShardingSpec()):
    """The eNTK of `f` at `params` as a host numpy array, tiled by `gram.blocked_gram`.

    Convenience glue: builds `empirical_ntk_fn(...)` and runs it per tile (jitted once per call). For
    repeated calls keep one `ntk = empirical_ntk_fn(...)` and call `blocked_gram(ntk, ..., args=(params,))`
    yourself, so the compiled tile is reused. The sign kernel is computed over all tiles (no symmetry).
    """
    if vmap_axes is None and block_size is not None:
        raise ValueError("vmap_axes=None (f mixes examples) cannot be tiled: pass block_size=None.")
    ntk = empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=vmap_axes, implementation=implementation,
                           reduce=reduce, accumulate_dtype=None, kernel=kernel)
    return _gram.blocked_gram(ntk, x1, x2, args=(params,), block_size=block_size,
                              symmetric=(x2 is None and kernel == "ntk"), accumulate_dtype=accumulate_dtype,
                              progress=progress, checkpoint_dir=checkpoint_dir, key=key, mesh=mesh,
                              sharding=sharding)


# ------------------------------------------------------------------------------------------ memory
def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a kernel request needs, from shapes only. Activations of the forward pass are not included."""

    jacobian_bytes: int  # J tiles (jacobian_contraction) or vmapped param tangents (ntk_vector_products)
    tile_bytes: int      # one kernel tile on the device
    kernel_bytes: int    # the full kernel on the host, in accumulate_dtype
    implementation: str

    @property
    def total_bytes(self) -> int:
        return self.jacobian_bytes + self.tile_bytes + self.kernel_bytes

    def fits(self, available_bytes: Optional[int]) -> Optional[bool]:
        return None if available_bytes is None else self.total_bytes <= available_bytes

    def __str__(self):
        return (f"MemoryEstimate[{self.implementation}]: jacobians {_human(self.jacobian_bytes)}, tile "
                f"{_human(self.tile_bytes)}, kernel {_human(self.kernel_bytes)}, total {_human(self.total_bytes)} "
                f"(forward activations not included)")


def estimate_memory(f, params, x1, x2=None, *, implementation="auto", block_size=None, trace_axes=(-1,),
                    vmap_axes=0, accumulate_dtype=np.float64) -> MemoryEstimate:
    """Bytes for `empirical_ntk(f, params, x1, x2, block_size=..., ...)`, from jax.eval_shape only.

    Jacobians of a tile: (n1 + n2)·O·Σ_leaves size·itemsize, n = min(block_size, N) (n1 only when x2 is
    None and unblocked, where J is computed once); for ntk_vector_products the vmapped param tangents,
    n2·O·P. The tile is n1·n2·O_k² in the output dtype, the kernel N1·N2·O_k² in accumulate_dtype.
    """
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}.")
    if implementation == "auto":
        implementation = choose_implementation(f, params, x1, x2, trace_axes=trace_axes, vmap_axes=vmap_axes)
    out = _out_shape(f, params, x1)
    n1 = out.shape[0]
    n2 = n1 if x2 is None else leading_size(x2, "x2")
    b1, b2 = (n1, n2) if block_size is None else (min(block_size, n1), min(block_size, n2))
    o = math.prod(out.shape[1:])
    traced = _normalize_trace_axes(trace_axes, out.ndim)
    o_k2 = math.prod(s for i, s in enumerate(out.shape[1:]) if i not in traced) ** 2
    per_row = o * sum(l.size * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(params))
    if implementation == "ntk_vector_products":
        jac = b2 * per_row
    else:
        jac = (b1 if x2 is None and block_size is None else b1 + b2) * per_row
    tile = b1 * b2 * o_k2 * np.dtype(out.dtype).itemsize
    return MemoryEstimate(jac, tile, n1 * n2 * o_k2 * np.dtype(accumulate_dtype).itemsize, implementation)


def available_memory(device=None) -> Optional[int]:
    """Free bytes on `device` (memory_stats: bytes_limit − bytes_in_use), else host MemAvailable, else None."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None
