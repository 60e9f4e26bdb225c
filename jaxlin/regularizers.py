"""Pulls toward the pretrained weights as optax GradientTransformations (docs/paper.md §3).

R1 `prox_l2`       always-on (λ/2)‖θ − a‖²: the regulariser under which linearized fine-tuning is KRR.
R2 `selective_prox` Eq. 8: add λ(θ − θ0) only when ∇R̃ᵀ(θ − θ0) ≥ 0 (keeps the loss monotone; for linear least
                   squares it essentially never fires, so GD reaches the min-norm interpolant, not KRR).
R3 `adamspd`       AdamSPD (Tian et al., NeurIPS 2024; GT-RIPL/Selective-Projection-Decay), per-tensor projection.

Anchor a (`anchor=`): "init" = the params passed to `init` (θ0; for LoRA that is (A0, B0 = 0)); "zero" = 0
(SPD's PEFT setting, `pre=None`: LoRA A and B both pulled to zero); or an explicit pytree with the params'
structure and shapes. The anchor lives in the transform's state (None for "zero", to save memory).

All three work on arbitrary pytrees and need `params` in `update(updates, state, params)`; optax.chain
passes them on. Ordering: coupled R1 and R2 act on gradients and go BEFORE the optimiser
(`optax.chain(prox_l2(λ), optax.adam(η))`, equal to adding the loss term); decoupled R1 goes AFTER it
(`optax.chain(optax.adam(η), prox_l2(λ, decoupled=True, learning_rate=η))`, like AdamW); R3 is an optimiser.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlin._types import PyTree

Anchor = Union[str, PyTree]
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


def _check_scalar(value, name, hint):
    if callable(value):
        return
    if isinstance(value, jax.core.Tracer):
        return
    v = np.asarray(value)
    if v.ndim != 0 or not np.isfinite(v) or v < 0:
        raise ValueError(f"{name}={value!r} must be a finite scalar ≥ 0 ({hint}).")


def _at(value: ScalarOrSchedule, count):
    return value(count) if callable(value) else value


def _check_anchor(anchor: Anchor):
    if isinstance(anchor, str) and anchor not in ("init", "zero"):
        raise ValueError(f"anchor={anchor!r}; use 'init' (θ0 = params at init), 'zero', or an explicit pytree.")


def _init_anchor(anchor: Anchor, params):
    """The anchor pytree to keep in the state (None for 'zero')."""
    if isinstance(anchor, str):
        if anchor == "zero":
            return None
        return jax.tree_util.tree_map(jnp.asarray, params)
    p_def, a_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(anchor)
    if p_def != a_def:
        raise ValueError(f"explicit anchor has tree structure {a_def} but params have {p_def}; pass an anchor "
                         "pytree shaped like the trainable params, or anchor='init'/'zero'.")
    for p, a in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(anchor)):
        if jnp.shape(p) != jnp.shape(a):
            raise ValueError(f"explicit anchor leaf of shape {jnp.shape(a)} does not match param shape "
                             f"{jnp.shape(p)}.")
    return jax.tree_util.tree_map(jnp.asarray, anchor)


def _need_params(params, name):
    if params is None:
        raise ValueError(f"{name} needs the current params: call update(updates, state, params) (optax.chain "
                         "forwards them), e.g. opt.update(grads, opt_state, params).")


def _offset(params, anchor):
    """θ − a, leaf by leaf (a = 0 when anchor is None)."""
    if anchor is None:
        return params
    return jax.tree_util.tree_map(lambda p, a: p - a.astype(p.dtype), params, anchor)


class ProxL2State(NamedTuple):
    anchor: PyTree        # a (None for anchor="zero")
    count: jax.Array      # steps taken, for schedules


def prox_l2(strength: ScalarOrSchedule, *, anchor: Anchor = "init", decoupled: bool = False,
            learning_rate: ScalarOrSchedule | None = None) -> optax.GradientTransformation:
    """R1, always-on pull toward the anchor a.

    Coupled (default; place BEFORE the optimiser): g ← g + λ(θ − a), the gradient of (λ/2)‖θ − a‖².
    Decoupled (place AFTER the optimiser, like AdamW's weight decay): u ← u − η_t λ(θ − a), with
    `learning_rate` η (scalar or optax schedule of the step count) — required. λ (`strength`) is in the
    loss's units per unit squared parameter distance; a scalar or a schedule of the step count.
    """
    _check_scalar(strength, "strength", "λ in (λ/2)‖θ−θ0‖²")
    _check_anchor(anchor)
    if decoupled and learning_rate is None:
        raise ValueError("prox_l2(decoupled=True) needs learning_rate (the optimiser's η, scalar or schedule): "
                         "the decoupled update is −η·λ(θ − θ0).")
    if not decoupled and learning_rate is not None:
        raise ValueError("learning_rate is only used with decoupled=True; in the coupled form the optimiser's "
                         "own learning rate scales the pull. Drop learning_rate or set decoupled=True.")
    if learning_rate is not None:
        _check_scalar(learning_rate, "learning_rate", "the optimiser's step size η")

    def init_fn(params):
        return ProxL2State(_init_anchor(anchor, params), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        _need_params(params, "prox_l2")
        lam = _at(strength, state.count)
        coef = -_at(learning_rate, state.count) * lam if decoupled else lam
        off = _offset(params, state.anchor)
        new = jax.tree_util.tree_map(lambda u, d: u + (coef * d).astype(u.dtype), updates, off)
        return new, ProxL2State(state.anchor, optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


class SelectiveProxState(NamedTuple):
    anchor: PyTree        # a (None for anchor="zero")
    fired: PyTree         # last step's indicator 1{∇R̃ᵀ(θ−a) ≥ 0}: a scalar (global) or one per leaf


def selective_prox(strength: float, *, anchor: Anchor = "init",
                   granularity: str = "global") -> optax.GradientTransformation:
    """R2, the paper's Eq. 8: g ← g + λ·1{gᵀ(θ − a) ≥ 0}·(θ − a). Place BEFORE the optimiser.

    granularity="global": one dot product over the whole pytree; "per_tensor": the test per leaf.
    The incoming `updates` are taken to be the raw loss gradient ∇R̃ (so put nothing before it that changes
    them). `state.fired` records the last indicator(s), as float 0/1.
    """
    if callable(strength):
        raise ValueError("selective_prox takes a scalar strength λ, not a schedule.")
    _check_scalar(strength, "strength", "λ of the selective pull")
    _check_anchor(anchor)
    if granularity not in ("global", "per_tensor"):
        raise ValueError(f"granularity={granularity!r}; use 'global' (one test over all params) or "
                         "'per_tensor' (one test per leaf).")

    def init_fn(params):
        if granularity == "global":
            fired = jnp.zeros((), jnp.float32)
        else:
            fired = jax.tree_util.tree_map(lambda p: jnp.zeros((), jnp.float32), params)
        return SelectiveProxState(_init_anchor(anchor, params), fired)

    def update_fn(updates, state, params=None):
        _need_params(params, "selective_prox")
        off = _offset(params, state.anchor)
        dots = jax.tree_util.tree_map(lambda g, d: jnp.sum(g * d), updates, off)
        if granularity == "global":
            fired = (sum(jax.tree_util.tree_leaves(dots)) >= 0).astype(jnp.float32)
            fire_tree = jax.tree_util.tree_map(lambda _: fired, dots)
        else:
            fired = fire_tree = jax.tree_util.tree_map(lambda s: (s >= 0).astype(jnp.float32), dots)
        new = jax.tree_util.tree_map(lambda g, d, f: g + (f * strength * d).astype(g.dtype), updates, off, fire_tree)
        return new, SelectiveProxState(state.anchor, fired)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamSPDState(NamedTuple):
    count: jax.Array      # steps taken (int32)
    mu: PyTree            # first moment
    nu: PyTree            # second moment
    anchor: PyTree        # a (None for anchor="zero")


def adamspd(learning_rate: ScalarOrSchedule, weight_decay: float, *, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, anchor: Anchor = "zero") -> optax.GradientTransformation:
    """R3, AdamSPD (Selective Projection Decay), as described in docs/paper.md §3.3. A full optimiser.

    Per step t (count from 1), per tensor θ with raw gradient g and anchor a:
        m ← b1 m + (1−b1) g,  v ← b2 v + (1−b2) g²,  θ̂ = θ − η_t · (m/(1−b1ᵗ)) / (√(v/(1−b2ᵗ)) + eps)
        if gᵀ(θ − a) > 0  (strict; the raw gradient points the descent direction toward a):
            ratio = clip_[0,1]((‖θ̂ − a‖ − ‖θ − a‖)/‖θ̂ − a‖)   (ratio = 0 when ‖θ̂ − a‖ = 0)
            θ̂ ← θ̂ − wd · ratio · (θ̂ − a)
    and the update is θ̂ − θ, so optax.apply_updates gives θ̂. `weight_decay` wd is a projection strength
    (dimensionless), not a gradient coefficient; it only touches tensors whose Adam step moved them away from a
    although their gradient pointed toward it. The reference writes the test as −gᵀ(θ − a) < 0. The default
    anchor "zero" is the SPD README's setting for PEFT; "init" anchors at θ0. η_t: scalar or schedule of the
    step count (evaluated at the count before the step, as optax does).
    """
    _check_scalar(weight_decay, "weight_decay", "the SPD projection strength")
    _check_scalar(learning_rate, "learning_rate", "Adam's step size η")
    _check_anchor(anchor)
    for name, b in (("b1", b1), ("b2", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}={b} must be in [0, 1) (e.g. b1=0.9, b2=0.999).")
    if not eps >= 0:
        raise ValueError(f"eps={eps} must be ≥ 0 (e.g. 1e-8).")

    def init_fn(params):
        def zeros():  # two distinct trees: the state may be donated, and a buffer cannot be donated twice
            return jax.tree_util.tree_map(jnp.zeros_like, params)

        return AdamSPDState(jnp.zeros((), jnp.int32), zeros(), zeros(), _init_anchor(anchor, params))

    def update_fn(grads, state, params=None):
        _need_params(params, "adamspd")
        lr = _at(learning_rate, state.count)
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        off = _offset(params, state.anchor)

        def leaf(g, m, v, d):
            t = count.astype(m.dtype)
            step = lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
            new_d = d - step                                   # θ̂ − a
            new_norm, old_norm = jnp.linalg.norm(new_d), jnp.linalg.norm(d)
            safe = jnp.where(new_norm > 0, new_norm, 1.0)
            ratio = jnp.where(new_norm > 0, jnp.clip((new_norm - old_norm) / safe, 0.0, 1.0), 0.0)
            apply = jnp.sum(g * d) > 0
            return (-step - jnp.where(apply, weight_decay * ratio, 0.0) * new_d).astype(d.dtype)

        updates = jax.tree_util.tree_map(leaf, grads, mu, nu, off)
        return updates, AdamSPDState(count, mu, nu, state.anchor)

    return optax.GradientTransformation(init_fn, update_fn)
