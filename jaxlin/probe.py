"""The linearity probe: how fast the Jacobian moves away from θ0 (docs/paper.md §4.4, Algorithm 1; §5.4 item 6).

The paper's Algorithm 1 ("Computation of L_avg and L_upper vs. r") is known only by its opening: for each
radius r draw n_T models θ = θ0 + r·v, v ~ N(0, I) normalised, compute a per-model estimate L_max(θ), and
report L_avg(r) = mean and L_upper(r) = max of L_max over the n_T models. Its inner loop is unknown, so
jaxlin offers three well-defined per-model estimates, each a lower bound of (or a check on) the local
Lipschitz constant L of J in assumption A1, ‖J(θ) − J(θ0)‖_op ≤ L‖θ − θ0‖ for ‖θ − θ0‖ ≤ R:

1. "jacobian" (matrix-free, default). J = ∂f(θ; X)/∂θ is the (N·O × P) Jacobian of the whole batch.
       L_J(θ) = max_u ‖(J(θ) − J(θ0)) u‖ / (r·‖u‖)
   over n_u random unit tangents u (Gaussian, normalised over the whole pytree), each product from one
   `jax.jvp` at θ and one at θ0; no Jacobian is materialised. Since ‖(J(θ)−J(θ0))u‖ ≤ ‖J(θ)−J(θ0)‖_op‖u‖,
   L_J ≤ ‖J(θ)−J(θ0)‖_op / r: a lower bound of the Lipschitz ratio along v (it tightens as n_u grows).
   The batch norm is ≥ every per-example norm ‖(J_x(θ)−J_x(θ0))u‖, so it also bounds the per-example
   completion of Algorithm 1 (max over x of ‖J_θ(x) − J_θ0(x)‖/r) from the same side.
2. "remainder" (Taylor remainder). With f_lin(θ) = f(θ0) + J(θ0)(θ − θ0) (one jvp at θ0 along v),
       Rem(θ) = max_x ‖f_x(θ) − f_lin,x(θ)‖ / r²       (norm over the O outputs of example x)
   and `mean_over_examples` the mean over x instead of the max. Since f(θ) − f_lin(θ) =
   ∫₀^r (J(θ0+sv) − J(θ0)) v ds, Rem ≤ L/2: an independent check of the second-order term (2·Rem ≤ L).
   In float32 it loses digits to cancellation at small r (f(θ) and f_lin agree to ~r²).
3. "ntk" (NTK-entry change, `ntk_entries=True`). With the traced kernel K_θ(x, x') = Σ_o ∂f_o(x)·∂f_o(x'),
       L_K(θ) = max_{(x, x')} |K_θ(x, x') − K_θ0(x, x')| / r
   over all N² calibration pairs of the batch (the second completion docs/paper.md §4.4 offers). K needs the
   per-example Jacobians (N, O, P) (`jaxlin.ntk.empirical_ntk_fn`, "jacobian_contraction": per-example
   `jax.jacrev`), so it is for small trainable sets (LoRA); the probe estimates the bytes first and raises
   above `ntk_max_bytes`. Assumes f treats examples independently (no cross-example coupling).

Per radius: L_avg(r) = mean, L_upper(r) = max, L_std(r) = std (ddof 0) of the per-model estimates over the
n_T directions; L_max (K × n_T) keeps every per-model value. The same directions and tangents are used at
every radius (common random numbers: the curves vs r are paired, not re-sampled). Seeds:
`key_dirs, key_tans = jax.random.split(jax.random.key(seed))`, then `random_unit_directions(key, params0, n)`.

LoRA at init (docs/paper.md §5.3): with B0 = 0, ∂f/∂A ≡ 0 at θ0, so J(θ0) has zero A-columns. A random v moves
both A and B; the fold s·A·B is bilinear, so ∂f/∂A becomes s·(r·v_B)-sized and J changes linearly in r from
the first step. L_J(r) therefore tends to a nonzero constant (the second derivative along v, including the
LoRA cross term) as r → 0, and the estimate is meaningful at every radius.

Compilation: two `jax.jit`s: `_at_origin` (f(θ0), J(θ0)u, J(θ0)v and K_θ0, shared by every radius, computed
once a probe) and `_at_radius`, with the radius a traced argument and f, the estimators and the chunking
static, so every radius of a grid, and a second grid, reuse one compile. Directions are vmapped
(or, with `chunk_size`, mapped in vmapped chunks by `jax.lax.map`); tangents are always vmapped.

On a device mesh (``mesh=``, docs/scaling.md) the same two jits run on arrays placed on the mesh, and XLA splits
the work by their shardings: the examples of the batch over the data axis (replicated when their number does not
divide it), θ0 and the frozen weights on the shardings they come with (replicated when not on the mesh), each
direction and tangent like its parameter (the direction axis replicated). Every process passes the same whole
batch and builds only its own devices' shards; the per-radius estimates come back replicated, so every process
returns the same result, equal to one device's up to float rounding.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._types import PyTree
from .data import batch_parts
from .ntk import empirical_ntk_fn
from .prefix import frozen_prefix as prefix_of
from .sharding import place
from .train import over_parts
from .train_mesh import MeshPlan

ESTIMATORS = ("jacobian", "remainder")
NTK_MAX_BYTES = 2**30
ESTIMATOR_NOTES = {
    "jacobian": "max over unit tangents u of ‖(J(θ)−J(θ0))u‖/r, J the batch Jacobian, two jvps per u; "
                "a lower bound of ‖J(θ)−J(θ0)‖_op/r (local Lipschitz constant of J along v)",
    "remainder": "max over examples x of ‖f_x(θ) − f_x(θ0) − J_x(θ0)(θ−θ0)‖/r²; ≤ L/2 (Taylor remainder); "
                 "mean_over_examples uses the mean over x",
    "ntk": "max over pairs (x, x') of the batch of |K_θ(x,x') − K_θ0(x,x')|/r, K traced over outputs, "
           "from per-example jacrev Jacobians",
}


def _unit(tree):
    """tree / ‖tree‖, the norm over every leaf together."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))
    return jax.tree.map(lambda leaf: leaf / norm.astype(leaf.dtype), tree)


def random_unit_directions(key, params: PyTree, num: int) -> PyTree:
    """`num` directions shaped like `params` (leaves (num, *leaf.shape), leaf dtypes): v ~ N(0, I) over all
    leaves together, normalised so that ‖v‖ = 1 over the whole pytree. Leaf i draws from split(key)[i]."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    raw = [jax.random.normal(k, (num,) + jnp.shape(leaf), jnp.result_type(leaf)) for k, leaf in zip(keys, leaves)]
    return jax.vmap(_unit)(jax.tree.unflatten(treedef, raw))


def _traced_ntk(f, f_args):
    """(batch, None, params) -> the (N, N) kernel traced over outputs, from per-example Jacobians."""
    return empirical_ntk_fn(lambda p, x: f(p, x, *f_args), implementation="jacobian_contraction")


@functools.partial(jax.jit, static_argnames=("f", "estimators", "ntk_entries"))
def _at_origin(f, params0, batch, f_args, directions, tangents, *, estimators, ntk_entries):
    """What every radius shares, computed once: f(θ0) (N, O), the unit tangents and J(θ0)u (U, N, O),
    J(θ0)v per unit direction (T, N, O) and the traced K_θ0 (N, N)."""
    f_x = lambda p: f(p, batch, *f_args)  # noqa: E731
    as_params = lambda tree: jax.tree.map(lambda d, p: d.astype(p.dtype), tree, params0)  # noqa: E731
    origin = {"f0": f_x(params0)}
    if "jacobian" in estimators:
        origin["tangents"] = jax.vmap(lambda u: _unit(as_params(u)))(tangents)
        origin["j0u"] = jax.vmap(lambda u: jax.jvp(f_x, (params0,), (u,))[1])(origin["tangents"])
    if "remainder" in estimators:
        origin["j0v"] = jax.vmap(lambda v: jax.jvp(f_x, (params0,), (_unit(as_params(v)),))[1])(directions)
    if ntk_entries:
        origin["k0"] = _traced_ntk(f, f_args)(batch, None, params0)
    return origin


@functools.partial(jax.jit, static_argnames=("f", "estimators", "ntk_entries", "chunk_size"))
def _at_radius(f, params0, batch, f_args, radius, directions, origin, *, estimators, ntk_entries, chunk_size):
    """Per-direction estimates {name: (T,)} at one radius (the formulas are in the module docstring)."""
    f_x = lambda p: f(p, batch, *f_args)  # noqa: E731
    as_params = lambda tree: jax.tree.map(lambda d, p: d.astype(p.dtype), tree, params0)  # noqa: E731
    n = origin["f0"].shape[0]

    def one(v_and_j0v):
        v, j0v_NO = v_and_j0v
        v = _unit(as_params(v))
        theta = jax.tree.map(lambda p, d: p + radius * d, params0, v)
        out = {}
        if "jacobian" in estimators:
            ju_UNO = jax.vmap(lambda u: jax.jvp(f_x, (theta,), (u,))[1])(origin["tangents"])
            diff_UM = (ju_UNO - origin["j0u"]).reshape(ju_UNO.shape[0], -1)
            out["jacobian"] = jnp.max(jnp.linalg.norm(diff_UM, axis=1)) / radius
        if "remainder" in estimators:
            rem_N = jnp.linalg.norm((f_x(theta) - origin["f0"] - radius * j0v_NO).reshape(n, -1), axis=1) / radius**2
            out["remainder"], out["remainder_mean"] = jnp.max(rem_N), jnp.mean(rem_N)
        if ntk_entries:
            out["ntk"] = jnp.max(jnp.abs(_traced_ntk(f, f_args)(batch, None, theta) - origin["k0"])) / radius
        return out

    per_direction = (directions, origin.get("j0v", jnp.zeros(jax.tree.leaves(directions)[0].shape[:1])))
    if chunk_size is None:
        return jax.vmap(one)(per_direction)
    return jax.lax.map(one, per_direction, batch_size=chunk_size)


def _check_estimators(estimators, ntk_entries) -> tuple[str, ...]:
    if isinstance(estimators, str):
        raise ValueError(f"estimators={estimators!r} must be a sequence of names, e.g. ({estimators!r},)")
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; valid: {ESTIMATORS} (the NTK-entry estimator is "
                         f"switched on by ntk_entries=True)")
    if not estimators and not ntk_entries:
        raise ValueError(f"nothing to estimate: pass estimators from {ESTIMATORS} or ntk_entries=True")
    return tuple(e for e in ESTIMATORS if e in estimators)


def _check_count(name: str, value, allow_none: bool = False):
    if allow_none and value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. 4")


def _check_radius(radius) -> float:
    r = float(radius)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"radius {radius!r} must be finite and > 0 (the estimates divide by r or r²); "
                         f"start the grid at a small positive r such as 1e-3")
    return r


def _shapes(f, params0, batch, f_args) -> dict:
    out = jax.eval_shape(f, params0, batch, *f_args)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 1:
        raise ValueError(f"f(params, batch) must return one array (N, O) or (N,); got {out}")
    leaves = jax.tree.leaves(params0)
    return {"num_examples": int(out.shape[0]), "num_outputs": int(math.prod(out.shape[1:])),
            "num_params": int(sum(np.size(leaf) for leaf in leaves)),
            "itemsize": max(jnp.result_type(leaf).itemsize for leaf in leaves)}


def _check_ntk_size(shapes: dict, num_directions: int, chunk_size, ntk_max_bytes: int):
    """J (N, O, P) is held for θ0 and for every direction of a chunk at once."""
    per_jac = shapes["num_examples"] * shapes["num_outputs"] * shapes["num_params"] * shapes["itemsize"]
    held = (min(chunk_size or num_directions, num_directions) + 1) * per_jac
    if held > ntk_max_bytes:
        raise ValueError(
            f"ntk_entries=True needs per-example Jacobians of N·O·P = {shapes['num_examples']}·"
            f"{shapes['num_outputs']}·{shapes['num_params']} entries ({per_jac / 2**20:.1f} MiB each), "
            f"{held / 2**20:.1f} MiB for θ0 and a chunk of directions, above ntk_max_bytes="
            f"{ntk_max_bytes / 2**20:.1f} MiB. Use the matrix-free estimators=('jacobian',) with "
            f"ntk_entries=False, fewer trainable parameters, a smaller chunk_size, or raise ntk_max_bytes")


def lipschitz_at_radius(f: Callable, params0: PyTree, batch, radius: float, directions: PyTree,
                        tangents: PyTree | None = None, *, estimators: Sequence[str] = ESTIMATORS,
                        ntk_entries: bool = False, chunk_size: int | None = None, f_args: tuple = (),
                        ntk_max_bytes: int = NTK_MAX_BYTES) -> dict:
    """Per-direction estimates at one radius: {name: (T,)} for θ_t = θ0 + radius·v_t/‖v_t‖.

    `directions` / `tangents`: pytrees like `params0` with a leading axis (T / U); each row is normalised
    over the whole pytree here, so any nonzero displacement works (e.g. θ_final − θ0 of a real run).
    Returns "jacobian", "remainder" (max over examples), "remainder_mean" (mean over examples), "ntk", as
    requested. `f(params, batch, *f_args)`: `f_args` are passed as traced arrays, not perturbed.
    """
    estimators = _check_estimators(estimators, ntk_entries)
    _check_count("chunk_size", chunk_size, allow_none=True)
    sizes = {jnp.shape(leaf)[:1] for leaf in jax.tree.leaves(directions)}
    if len(sizes) != 1 or sizes == {()} or jax.tree.structure(directions) != jax.tree.structure(params0):
        raise ValueError(f"directions must be shaped like params0 with one shared leading axis (T, ...); got "
                         f"leading shapes {sorted(sizes)}")
    if "jacobian" in estimators and tangents is None:
        raise ValueError("the 'jacobian' estimator needs tangents (U, ...) shaped like params0, e.g. "
                         "random_unit_directions(key, params0, 4)")
    if ntk_entries:
        _check_ntk_size(_shapes(f, params0, batch, tuple(f_args)), sizes.pop()[0], chunk_size, ntk_max_bytes)
    origin = _at_origin(f, params0, batch, tuple(f_args), directions, tangents, estimators=estimators,
                        ntk_entries=bool(ntk_entries))
    return _at_radius(f, params0, batch, tuple(f_args), _check_radius(radius), directions, origin,
                      estimators=estimators, ntk_entries=bool(ntk_entries), chunk_size=chunk_size)


def _on_mesh(plan: MeshPlan, params0, batch, f_args, directions, tangents):
    """(params0, batch, f_args, directions, tangents) placed on the plan's mesh (module docstring)."""
    params0, f_args = plan.place(params0), plan.place(f_args)
    rows = {np.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
    by_rows = plan.rows if len(rows) == 1 and rows.pop() % plan.data_size == 0 else plan.replicated
    batch = place(batch, jax.tree.map(lambda _: by_rows, batch))

    def like_params(tree):  # (K, *leaf.shape) leaves: the parameter's spec after a replicated leading axis
        spec = lambda p: p.sharding.spec if isinstance(p.sharding, NamedSharding) else P()  # noqa: E731
        return None if tree is None else place(tree, jax.tree.map(
            lambda p: NamedSharding(plan.mesh, P(None, *spec(p))), params0))

    return params0, batch, f_args, like_params(directions), like_params(tangents)


def linearity_probe(f: Callable, params0: PyTree, batch, *, radii: Sequence[float], num_directions: int = 8,
                    num_tangents: int = 4, seed: int = 0, estimators: Sequence[str] = ESTIMATORS,
                    ntk_entries: bool = False, chunk_size: int | None = None, f_args: tuple = (),
                    ntk_max_bytes: int = NTK_MAX_BYTES, mesh: Mesh | None = None, data_axis: str = "data") -> dict:
    """Algorithm 1 (completed as in the module docstring) for `f(params, batch, *f_args) -> (N, O)`.

    `mesh`, `data_axis`: run on a `jax.sharding.Mesh`, the batch's examples over `data_axis` (module docstring);
    with several processes every process passes the same `batch`, `params0` and `f_args` and gets the same result.

    Returns a JSON-friendly dict: "radii"; "estimates": {name: {"L_avg", "L_upper", "L_std": [per radius],
    "L_max": [[per direction] per radius]}} (the remainder also has "mean_over_examples": per radius, the
    direction-mean of the example-mean); "settings"; "estimator_notes".
    """
    estimators = _check_estimators(estimators, ntk_entries)
    _check_count("num_directions", num_directions)
    _check_count("num_tangents", num_tangents)
    if isinstance(radii, (int, float)) or len(radii) == 0:
        raise ValueError(f"radii={radii!r} must be a non-empty sequence of positive radii, e.g. [1e-3, 1e-2, 1e-1]")
    radii = [_check_radius(r) for r in radii]
    shapes = _shapes(f, params0, batch, tuple(f_args))
    key_dirs, key_tans = jax.random.split(jax.random.key(seed))
    directions = random_unit_directions(key_dirs, params0, num_directions)
    tangents = random_unit_directions(key_tans, params0, num_tangents) if "jacobian" in estimators else None
    _check_count("chunk_size", chunk_size, allow_none=True)
    if ntk_entries:
        _check_ntk_size(shapes, num_directions, chunk_size, ntk_max_bytes)
    f_args = tuple(f_args)
    fetch = jax.device_get
    if mesh is not None:
        plan = MeshPlan(mesh, data_axis)
        params0, batch, f_args, directions, tangents = _on_mesh(plan, params0, batch, f_args, directions, tangents)
        fetch = lambda out: jax.device_get(jax.device_put(out, plan.replicated))  # noqa: E731
    kw = dict(estimators=estimators, ntk_entries=bool(ntk_entries))
    origin = _at_origin(f, params0, batch, f_args, directions, tangents, **kw)
    per_radius = [fetch(_at_radius(f, params0, batch, f_args, r, directions, origin, chunk_size=chunk_size, **kw))
                  for r in radii]
    names = estimators + (("ntk",) if ntk_entries else ())
    estimates = {}
    for name in names:
        values_KT = np.stack([np.asarray(p[name], np.float64) for p in per_radius])
        estimates[name] = {"L_avg": values_KT.mean(1).tolist(), "L_upper": values_KT.max(1).tolist(),
                           "L_std": values_KT.std(1).tolist(), "L_max": values_KT.tolist()}
    if "remainder" in estimates:
        estimates["remainder"]["mean_over_examples"] = [float(np.mean(p["remainder_mean"])) for p in per_radius]
    settings = {"num_directions": num_directions, "num_tangents": num_tangents, "seed": seed,
                "estimators": list(names), "ntk_entries": bool(ntk_entries), "chunk_size": chunk_size,
                "direction_distribution": "N(0, I) over all trainable leaves, normalised to ‖v‖ = 1",
                "num_examples": shapes["num_examples"], "num_outputs": shapes["num_outputs"],
                "num_params": shapes["num_params"]}
    return {"radii": radii, "estimates": estimates, "settings": settings,
            "estimator_notes": {name: ESTIMATOR_NOTES[name] for name in names}}


def _call(trainable, batch, f):
    return over_parts(f, trainable, batch)


def probe_adapted(adapted, batch, *, output_fn: Callable | None = None, frozen_prefix: bool = True, **kw) -> dict:
    """`linearity_probe` of f = adapted.as_function(output_fn) at θ0 = adapted.trainable; `batch` holds
    "input_ids" and "attention_mask" (for a label-word readout: ``readout.encode(texts)`` and ``output_fn=
    readout.output_fn``, so f is the (N, C) label-word logits), or "parts" of them (`jaxlin.data.pad_parts`: the
    same examples with less padding; the estimates do not depend on their order); keywords as linearity_probe.
    f travels in `f_args`, so the frozen weights are traced arguments (not baked constants) and repeated probes
    of one model share the jit cache. On a mesh (``mesh=``) the parameters stay on their shardings (e.g. those of
    `jaxlin.sharding.shard_adapted`) and the examples are split over the data axis (module docstring).
    ``frozen_prefix``: without a mesh, f runs from the lowest trained block, the blocks below computed once
    (`jaxlin.prefix`; the same values up to float rounding); the result's "prefix_start_layer" says where."""
    parts = batch_parts(batch)
    missing = {"input_ids", "attention_mask"} - set().union(*parts)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}; pass {{'input_ids': (N, L), 'attention_mask': (N, L)}}")
    parts = tuple({"input_ids": np.asarray(b["input_ids"]), "attention_mask": np.asarray(b["attention_mask"])}
                  for b in parts)
    inputs = {"parts": parts} if "parts" in batch else parts[0]
    f = adapted.as_function(output_fn)
    prefix = prefix_of(f, adapted.trainable) if frozen_prefix and kw.get("mesh") is None else None
    if prefix is not None:
        f, inputs = prefix.function, prefix.attach(inputs)
    found = linearity_probe(_call, adapted.trainable, inputs, f_args=(f,), **kw)
    return {**found, "prefix_start_layer": 0 if prefix is None else prefix.start_layer}


__all__ = ["ESTIMATORS", "linearity_probe", "lipschitz_at_radius", "probe_adapted", "random_unit_directions"]
