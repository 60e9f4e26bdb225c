"""jaxlin.regularizers: R1 prox, R2 selective (Eq. 8), R3 AdamSPD against analytic answers and numpy references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlin import regularizers as reg


def _split(vec, sizes=(20, 17)):
    return {"a": jnp.asarray(vec[: sizes[0]]), "b": jnp.asarray(vec[sizes[0]:])}


def _flat(tree):
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"])])


def _run(opt, loss, params, steps, record=None):
    """`steps` optimiser steps under one jit; returns final params (and record(state) per step)."""
    state = opt.init(params)

    def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (record(s) if record else 0)

    (p, _), rec = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(params, state)
    return p, rec


def test_selective_reaches_min_norm_interpolant_always_on_reaches_krr():
    """docs/paper.md §3.2: on linear least squares Eq. 8 essentially never fires → J⁺r0; always-on R1 → KRR."""
    n, p, lam = 11, 37, 1.0
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(n, p)) / np.sqrt(p)
    r0 = rng.normal(size=n)
    theta0 = rng.normal(size=p)
    params0 = _split(theta0)
    loss = lambda t: 0.5 * jnp.sum((jnp.asarray(jac) @ (jnp.concatenate([t["a"], t["b"]]) - theta0) - r0) ** 2)
    mu = np.linalg.eigvalsh(jac @ jac.T)
    eta = 1.0 / (mu[-1] + lam)
    steps = int(np.ceil(np.log(1e-12) / np.log(1 - eta * mu[0])))      # unregularised rate, the slower one
    sel, fired = _run(optax.chain(reg.selective_prox(lam), optax.sgd(eta)), loss, params0, steps,
                      record=lambda s: s[0].fired)
    prox, _ = _run(optax.chain(reg.prox_l2(lam), optax.sgd(eta)), loss, params0, steps)
    min_norm = np.linalg.pinv(jac) @ r0
    krr = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(n), r0)
    np.testing.assert_allclose(_flat(sel) - theta0, min_norm, atol=1e-8)
    np.testing.assert_allclose(jac @ (_flat(sel) - theta0), r0, atol=1e-8)           # fits the targets
    np.testing.assert_allclose(_flat(prox) - theta0, krr, atol=1e-8)
    assert np.linalg.norm(min_norm - krr) > 0.1                                      # the two really differ
    fired = np.asarray(fired)               # the indicator of each step: at θ0 the test is 0 ≥ 0 (adds λ·0)
    assert fired[0] == 1 and np.all(fired[1:] == 0)                                  # then it never fires


def test_prox_l2_coupled_fixed_point_for_each_anchor():
    rng = np.random.default_rng(1)
    mat, y, lam = rng.normal(size=(17, 37)) / 5, rng.normal(size=17), 0.7
    theta0 = rng.normal(size=37)
    explicit = rng.normal(size=37)
    loss = lambda t: 0.5 * jnp.sum((jnp.asarray(mat) @ jnp.concatenate([t["a"], t["b"]]) - y) ** 2)
    eta = 1.0 / (np.linalg.eigvalsh(mat.T @ mat)[-1] + lam)
    for anchor, a in (("init", theta0), ("zero", np.zeros(37)), (_split(explicit), explicit)):
        out, _ = _run(optax.chain(reg.prox_l2(lam, anchor=anchor), optax.sgd(eta)), loss, _split(theta0), 600)
        ref = np.linalg.solve(mat.T @ mat + lam * np.eye(37), mat.T @ y + lam * a)
        np.testing.assert_allclose(_flat(out), ref, atol=1e-9)


def test_prox_l2_decoupled_update_and_schedule():
    theta0 = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
    theta = {"w": jnp.array([1.5, -1.0, 2.0]), "b": jnp.array([0.0])}
    zero_g = jax.tree_util.tree_map(jnp.zeros_like, theta)
    eta, lam = 0.1, 0.3
    opt = optax.chain(optax.sgd(eta), reg.prox_l2(lam, decoupled=True, learning_rate=eta))
    u, _ = opt.update(zero_g, opt.init(theta0), theta)
    chex.assert_trees_all_close(u, jax.tree.map(lambda t, t0: -eta * lam * (t - t0), theta, theta0), rtol=1e-14)
    sched = lambda count: 0.1 * (count + 1)
    tx = reg.prox_l2(lam, decoupled=True, learning_rate=sched, anchor="zero")
    s = tx.init(theta0)
    u0, s = tx.update(zero_g, s, theta)
    u1, _ = tx.update(zero_g, s, theta)
    np.testing.assert_allclose(u0["w"], -0.1 * lam * theta["w"], rtol=1e-14)
    np.testing.assert_allclose(u1["w"], -0.2 * lam * theta["w"], rtol=1e-14)
    assert tx.init(theta0).anchor is None                                           # "zero" stores nothing


def test_prox_l2_coupled_adds_gradient_of_penalty():
    theta0 = {"w": jnp.array([1.0, 2.0])}
    theta = {"w": jnp.array([2.0, 0.0])}
    g = {"w": jnp.array([0.25, -0.5])}
    tx = reg.prox_l2(2.0)
    u, _ = tx.update(g, tx.init(theta0), theta)
    np.testing.assert_allclose(u["w"], [0.25 + 2.0, -0.5 - 4.0])


def test_errors_are_clear():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs learning_rate"):
        reg.prox_l2(1.0, decoupled=True)
    with pytest.raises(ValueError, match="only used with decoupled=True"):
        reg.prox_l2(1.0, learning_rate=0.1)
    with pytest.raises(ValueError, match="strength=-1"):
        reg.prox_l2(-1.0)
    with pytest.raises(ValueError, match="anchor='pre'"):
        reg.selective_prox(1.0, anchor="pre")
    with pytest.raises(ValueError, match="granularity"):
        reg.selective_prox(1.0, granularity="layer")
    with pytest.raises(ValueError, match="tree structure"):
        reg.prox_l2(1.0, anchor={"v": jnp.ones(3)}).init(params)
    with pytest.raises(ValueError, match="does not match param shape"):
        reg.adamspd(0.1, 0.1, anchor={"w": jnp.ones(4)}).init(params)
    for tx in (reg.prox_l2(1.0), reg.selective_prox(1.0), reg.adamspd(0.1, 0.1)):
        with pytest.raises(ValueError, match="needs the current params"):
            tx.update(params, tx.init(params))


@pytest.mark.parametrize("b_dot", [-2.0, -8.0])
def test_selective_prox_fires_only_when_test_is_nonnegative(b_dot):
    theta0 = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    theta = {"a": jnp.array([1.0, 2.0, 0.0]), "b": jnp.array([1.0, -1.0])}
    g = {"a": jnp.array([1.0, 2.0, 7.0]),                                  # gₐ·dₐ = 5 ≥ 0
         "b": jnp.array([b_dot / 2, -b_dot / 2])}                          # g_b·d_b = b_dot < 0
    lam = 0.5
    for gran in ("global", "per_tensor"):
        tx = reg.selective_prox(lam, granularity=gran)
        u, s = tx.update(g, tx.init(theta0), theta)
        fire_a = 1.0 if gran == "per_tensor" else float(5.0 + b_dot >= 0)
        fire_b = 0.0 if gran == "per_tensor" else float(5.0 + b_dot >= 0)
        np.testing.assert_allclose(u["a"], g["a"] + fire_a * lam * theta["a"], rtol=1e-14)
        np.testing.assert_allclose(u["b"], g["b"] + fire_b * lam * theta["b"], rtol=1e-14)
        if gran == "global":
            assert float(s.fired) == fire_a
        else:
            assert float(s.fired["a"]) == 1.0 and float(s.fired["b"]) == 0.0
    # explicit anchor: the test uses θ − a, not θ
    anchor = {"a": 2.0 * theta["a"], "b": jnp.zeros(2)}
    tx = reg.selective_prox(lam, anchor=anchor, granularity="per_tensor")
    u, s = tx.update(g, tx.init(theta0), theta)
    assert float(s.fired["a"]) == 0.0                                      # gₐ·(θ − 2θ) = −5 < 0
    np.testing.assert_allclose(u["a"], g["a"], rtol=1e-14)


def _np_adamspd(params, anchor, grad_fn, lrs, wd, b1, b2, eps):
    """Hand-written AdamSPD (docs/paper.md §3.3), learning rate lrs[t-1] at step t; logs (cond, raw ratio) per leaf."""
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    traj, log = [], []
    for t, lr in enumerate(lrs, 1):
        g = grad_fn(t, params)
        entry = {}
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            new = params[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
            a = anchor[k]
            cond = float(np.sum(g[k] * (params[k] - a))) > 0
            raw = None
            if cond:
                cn, pn = np.linalg.norm(new - a), np.linalg.norm(params[k] - a)
                raw = (cn - pn) / cn if cn > 0 else 0.0
                new = new - wd * np.clip(raw, 0.0, 1.0) * (new - a)
            params[k] = new
            entry[k] = (cond, raw)
        traj.append({k: v.copy() for k, v in params.items()})
        log.append(entry)
    return traj, log


def _jax_adamspd(tx, params, grad_fn, steps):
    state, traj = tx.init(params), []
    for t in range(1, steps + 1):
        g = {k: jnp.asarray(v) for k, v in grad_fn(t, {k: np.asarray(x) for k, x in params.items()}).items()}
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        traj.append(params)
    return traj


def test_adamspd_matches_numpy_reference_inconsistent_and_consistent_leaves():
    theta0 = {"w": np.array([0.5, -0.3, 0.2, 0.1, 0.4]), "b": np.array([0.3, -0.2, 0.6])}

    def grads(t, p):                         # anchor zero: d = θ
        w = -p["w"] if t <= 2 else 0.05 * p["w"]   # steps 1-2 push away; then gᵀd > 0 while momentum moves away
        return {"w": w, "b": 0.5 * p["b"]}         # always toward the anchor: test true, ratio clipped to 0

    ref, log = _np_adamspd(theta0, {k: np.zeros_like(v) for k, v in theta0.items()}, grads, [0.05] * 6,
                           wd=0.3, b1=0.9, b2=0.999, eps=1e-8)
    out = _jax_adamspd(reg.adamspd(0.05, 0.3, anchor="zero"), {k: jnp.asarray(v) for k, v in theta0.items()},
                       grads, 6)
    chex.assert_trees_all_close(out, ref, rtol=1e-12, atol=1e-14)
    assert any(e["w"][0] and e["w"][1] > 0 for e in log)              # "w" was projected at some step
    assert all(e["b"][0] and e["b"][1] < 0 for e in log)              # "b": test fired, ratio clipped to 0
    plain = _jax_adamspd(reg.adamspd(0.05, 0.0, anchor="zero"), {k: jnp.asarray(v) for k, v in theta0.items()},
                         grads, 6)
    np.testing.assert_allclose(plain[-1]["b"], out[-1]["b"], rtol=1e-13)   # clipped ratio: b is plain Adam
    assert not np.allclose(plain[-1]["w"], out[-1]["w"])


@pytest.mark.parametrize("anchor", ["init", "zero", "explicit"])
def test_adamspd_anchors_match_reference(anchor):
    rng = np.random.default_rng(3)
    theta0 = {"w": rng.normal(size=(3, 5)), "b": rng.normal(size=(7,))}
    explicit = {k: rng.normal(size=v.shape) for k, v in theta0.items()}
    a = {"init": theta0, "zero": {k: np.zeros_like(v) for k, v in theta0.items()}, "explicit": explicit}[anchor]
    gseq = [{k: rng.normal(size=v.shape) for k, v in theta0.items()} for _ in range(5)]
    grads = lambda t, p: {k: gseq[t - 1][k] + 0.5 * (p[k] - a[k]) for k in p}
    sched = optax.linear_schedule(0.02, 0.1, 4)
    tx = reg.adamspd(sched, 0.4, anchor=jax.tree_util.tree_map(jnp.asarray, explicit) if anchor == "explicit"
                     else anchor)
    out = _jax_adamspd(tx, {k: jnp.asarray(v) for k, v in theta0.items()}, grads, 5)
    lrs = [float(sched(jnp.int32(c))) for c in range(5)]   # the schedule sees the int32 count before each step
    ref, log = _np_adamspd(theta0, a, grads, lrs, wd=0.4, b1=0.9, b2=0.999, eps=1e-8)
    chex.assert_trees_all_close(out, ref, rtol=1e-12, atol=1e-14)
    assert any(e[k][0] for e in log for k in e)         # the selective test fired somewhere


def test_adamspd_zero_norm_guard_and_init_anchor_first_step():
    # b1 = b2 = 0.5, eps = 0, g = 1: the first Adam step is exactly lr, so θ̂ = a = 0 while gᵀ(θ − a) > 0.
    tx = reg.adamspd(0.5, 0.7, b1=0.5, b2=0.5, eps=0.0, anchor="zero")
    params = {"w": jnp.array([0.5, 0.5])}
    u, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    assert np.all(np.isfinite(u["w"]))
    np.testing.assert_array_equal(u["w"], [-0.5, -0.5])
    # anchor "init": at θ = θ0 the test gᵀ(θ − θ0) = 0 is not > 0, so the first step is plain Adam
    tx = reg.adamspd(0.1, 0.9, anchor="init")
    g = {"w": jnp.array([0.3, -2.0])}
    u, _ = tx.update(g, tx.init(params), params)
    u_adam, _ = optax.adam(0.1).update(g, optax.adam(0.1).init(params), params)
    np.testing.assert_allclose(u["w"], u_adam["w"], rtol=1e-14)
