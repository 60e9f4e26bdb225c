"""jaxlin.solve against dense float64 references (np.linalg.solve, eigh, expm, explicit J)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxlin import solve

N, P, O, M = 13, 29, 3, 7


def _problem(seed=0, n=N, p=P):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(n, p)) / np.sqrt(p)
    return jac, jac @ jac.T, rng.normal(size=n)


def _krr(gram, y, lam):
    return np.linalg.solve(gram + lam * np.eye(len(gram)), y)


def test_kernel_ridge_matches_solve_and_float32_input():
    jac, gram, y = _problem()
    sol = solve.kernel_ridge(gram, y, 0.37)
    assert sol.status == "ok" and "Cholesky" in sol.message
    assert sol.value.dtype == jnp.float64 and sol.value.shape == (N,)
    np.testing.assert_allclose(sol.value, _krr(gram, y, 0.37), rtol=1e-12, atol=1e-12)
    sol32 = solve.kernel_ridge(gram.astype(np.float32), y.astype(np.float32), 0.37)
    assert sol32.value.dtype == jnp.float64
    np.testing.assert_allclose(sol32.value, _krr(gram, y, 0.37), rtol=1e-4, atol=1e-5)
    # "trace" scale: λ_abs = ridge · trace(K)/n
    tr = solve.kernel_ridge(gram, y, 0.1, ridge_scale="trace")
    lam = 0.1 * np.trace(gram) / N
    np.testing.assert_allclose(tr.ridge, lam, rtol=1e-14)
    np.testing.assert_allclose(tr.value, _krr(gram, y, lam), rtol=1e-12, atol=1e-12)


def test_kernel_ridge_multi_output_blocks_and_predict():
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(N + M, O, P)) / np.sqrt(P)              # per-output Jacobian (N+M, O, P)
    g4 = np.einsum("iap,jbp->ijab", jac, jac)                       # (N+M, N+M, O, O)
    y = np.eye(O)[rng.integers(0, O, size=N)] * 2 - 1               # ±1 multi-output targets
    train = g4[:N, :N]
    flat = jac[:N].reshape(N * O, P) @ jac[:N].reshape(N * O, P).T  # example-major (N·O, N·O)
    ref = _krr(flat, y.reshape(-1), 0.2).reshape(N, O)
    for g in (train, flat):
        sol = solve.kernel_ridge(g, y, 0.2)
        assert sol.value.shape == (N, O)
        np.testing.assert_allclose(sol.value, ref, rtol=1e-11, atol=1e-12)
    f0 = rng.normal(size=(M, O))
    cross = g4[N:, :N]
    pred_ref = f0 + (jac[N:].reshape(M * O, P) @ jac[:N].reshape(N * O, P).T @ ref.reshape(-1)).reshape(M, O)
    np.testing.assert_allclose(solve.kernel_predict(cross, ref, f0), pred_ref, rtol=1e-12, atol=1e-12)
    cross2 = cross.transpose(0, 2, 1, 3).reshape(M * O, N * O)
    np.testing.assert_allclose(solve.kernel_predict(cross2, ref, f0), pred_ref, rtol=1e-12, atol=1e-12)
    # a scalar kernel shared by O outputs: independent columns
    g2 = jac[:N, 0] @ jac[:N, 0].T
    shared = solve.kernel_ridge(g2, y, 0.2)
    np.testing.assert_allclose(shared.value, _krr(g2, y, 0.2), rtol=1e-11, atol=1e-12)


def test_ridge_path_equals_separate_solves_and_derived_quantities():
    jac, gram, r0 = _problem(2)
    grid = np.array([1e-3, 0.05, 0.5, 3.0, 40.0])
    path = solve.ridge_path(gram, r0, grid)
    assert path.status == "ok" and path.dual.shape == (len(grid), N)
    rng = np.random.default_rng(3)
    jac_eval = rng.normal(size=(M, P)) / np.sqrt(P)
    preds = path.predict(jac_eval @ jac.T, np.ones(M))
    for k, lam in enumerate(grid):
        alpha = _krr(gram, r0, lam)
        delta = jac.T @ alpha                                       # δ* = Jᵀ(K+λI)⁻¹r0
        np.testing.assert_allclose(path.dual[k], alpha, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(path.train_resid[k], lam * alpha, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(path.train_change[k], jac @ delta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(path.train_predictions(r0 * 0 + 1)[k], 1 + jac @ delta, rtol=1e-10)
        np.testing.assert_allclose(path.objective[k], 0.5 * lam * r0 @ alpha, rtol=1e-10)
        np.testing.assert_allclose(path.delta_sq_norm[k], delta @ delta, rtol=1e-10)
        np.testing.assert_allclose(path.delta_norm[k], np.linalg.norm(delta), rtol=1e-10)
        np.testing.assert_allclose(preds[k], 1 + jac_eval @ delta, rtol=1e-10, atol=1e-12)
        # the objective equals the primal objective at δ*: ½‖r0 − Jδ‖² + (λ/2)‖δ‖²
        primal = 0.5 * np.sum((r0 - jac @ delta) ** 2) + 0.5 * lam * delta @ delta
        np.testing.assert_allclose(path.objective[k], primal, rtol=1e-10)
    trace_path = solve.ridge_path(gram, r0, grid, ridge_scale="trace")
    np.testing.assert_allclose(trace_path.ridges, grid * np.trace(gram) / N, rtol=1e-14)


def test_ridge_path_jit_does_not_recompile():
    chex.clear_trace_counter()  # chex counts traces per function footprint, kept across tests
    fn = jax.jit(chex.assert_max_traces(solve.ridge_path, n=1))
    _, gram, r0 = _problem(4)
    a = fn(gram, r0, jnp.array([0.1, 1.0, 10.0]))
    b = fn(gram * 2.0, r0 + 1.0, jnp.array([0.2, 2.0, 20.0]))  # same shapes, other values: a retrace would raise
    jax.block_until_ready((a, b))
    assert a.status == "ok" and b.status == "ok"


def test_not_psd_status_and_message():
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    gram = q @ np.diag([3.0, 1.0, 0.5, 0.2, -2.0]) @ q.T
    sol = solve.kernel_ridge(gram, np.ones(5), 1.0)
    assert sol.status == "not_psd"
    assert "smallest eigenvalue" in sol.message and "-2" in sol.message and "ridge=" in sol.message
    np.testing.assert_allclose(sol.min_eig, -2.0, rtol=1e-10)
    assert solve.kernel_ridge(gram, np.ones(5), sol.suggested_ridge).status == "ok"
    path = solve.ridge_path(gram, np.ones(5), np.array([1.0, 3.0]))
    assert path.status == "not_psd" and list(np.asarray(path.status_code)) == [1, 0]
    assert "not_psd" in path.message


def test_cg_breakdown_names_the_operator_it_solved():
    sol = solve.conjugate_gradient(lambda v: -2.0 * v, np.ones(5), 1.0)  # K + λI = −I: not positive definite
    assert sol.status == "not_psd" and "pᵀ(K+λI)p ≤ 0" in sol.message, sol.message


def test_bad_input_errors():
    _, gram, y = _problem(6)
    with pytest.raises(ValueError, match="ridge=-0.5"):
        solve.kernel_ridge(gram, y, -0.5)
    with pytest.raises(ValueError, match="square"):
        solve.kernel_ridge(gram[:, :-1], y, 0.1)
    with pytest.raises(ValueError, match=r"targets has shape \(12,\)"):
        solve.kernel_ridge(gram, y[:-1], 0.1)
    with pytest.raises(ValueError, match="ridge_scale"):
        solve.kernel_ridge(gram, y, 0.1, ridge_scale="relative")
    with pytest.raises(ValueError, match="ridges"):
        solve.ridge_path(gram, y, np.array([0.1, -1.0]))
    with pytest.raises(ValueError, match="1-D grid"):
        solve.ridge_path(gram, y, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        solve.kernel_predict(np.ones((M, N + 1)), y)
    with pytest.raises(ValueError, match="steps"):
        solve.gd_dynamics(gram, y, 0.1, 0.5, np.array([1.5]))


class ConjugateGradientTest(chex.TestCase):
    """The same checks with and without jit: the status and message must not depend on tracing."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_cholesky_and_reports_non_convergence(self):
        jac, gram, y = _problem(7)
        mv = lambda v: jac @ (jac.T @ v)                                 # NTK-vector product K v = J(Jᵀv)
        sol = self.variant(lambda b: solve.conjugate_gradient(mv, b, 0.3, tol=1e-12, max_iters=60))(y)
        assert sol.status == "ok", sol.message
        assert 0 < int(sol.iterations) <= 60 and float(sol.residual) <= 1e-12
        np.testing.assert_allclose(sol.value, _krr(gram, y, 0.3), rtol=1e-8, atol=1e-10)
        short = self.variant(lambda b: solve.conjugate_gradient(mv, b, 0.3, tol=1e-12, max_iters=2))(y)
        assert short.status == "not_converged" and int(short.iterations) == 2
        assert "2 iterations" in short.message and "max_iters" in short.message and "ridge" in short.message
        zero = self.variant(lambda b: solve.conjugate_gradient(mv, b, 0.3, tol=1e-10))(np.zeros(N))
        assert zero.status == "ok" and int(zero.iterations) == 0
        with pytest.raises(ValueError, match="tol"):
            self.variant(lambda b: solve.conjugate_gradient(mv, b, 0.3, tol=0.0))(y)


def _explicit_gd(jac, r0, lam, eta, steps):
    delta, out = np.zeros(jac.shape[1]), {}
    for t in range(max(steps) + 1):
        if t in steps:
            out[t] = delta.copy()
        delta = delta - eta * (jac.T @ (jac @ delta - r0) + lam * delta)
    return out


def test_gd_dynamics_closed_form_equals_explicit_iterations():
    jac, gram, r0 = _problem(8)
    lam = 0.21
    eta = 0.45 * float(solve.stable_learning_rate(gram, lam))          # 0.45 · 2/(μ_max+λ)
    steps = [0, 1, 2, 7, 31, 120]
    dyn = solve.gd_dynamics(gram, r0, lam, eta, np.array(steps))
    assert dyn.status == "ok"
    ref = _explicit_gd(jac, r0, lam, eta, steps)
    for i, t in enumerate(steps):
        u = jac @ ref[t]
        np.testing.assert_allclose(dyn.change[i], u, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dyn.resid[i], r0 - u, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dyn.loss[i], 0.5 * np.sum((r0 - u) ** 2), rtol=1e-10)
        np.testing.assert_allclose(dyn.delta_sq_norm[i], ref[t] @ ref[t], rtol=1e-10, atol=1e-14)
    # an oscillating but stable rate (1 − η(μ+λ) < 0 for the top modes) still matches
    eta2 = 0.95 * float(solve.stable_learning_rate(gram, lam))
    dyn2 = solve.gd_dynamics(gram, r0, lam, eta2, np.array(steps))
    ref2 = _explicit_gd(jac, r0, lam, eta2, steps)
    for i, t in enumerate(steps):
        np.testing.assert_allclose(dyn2.change[i], jac @ ref2[t], rtol=1e-9, atol=1e-11)
    bad = solve.gd_dynamics(gram, r0, lam, 1.01 * float(solve.stable_learning_rate(gram, lam)), 3)
    assert bad.status == "unstable" and "2/(μ_max+λ)" in bad.message
    with pytest.raises(ValueError, match="stable range"):
        solve.check_learning_rate(gram, lam, 1.01 * float(solve.stable_learning_rate(gram, lam)))


def test_flow_dynamics_matches_expm():
    jac, gram, r0 = _problem(9)
    lam, times = 0.4, np.array([0.0, 0.3, 2.5, 17.0])
    dyn = solve.flow_dynamics(gram, r0, lam, times)
    hess, grad0 = jac.T @ jac + lam * np.eye(P), jac.T @ r0
    for i, t in enumerate(times):
        # dδ/dt = −Hδ + Jᵀr0, δ(0)=0  ⇒  δ(t) = H⁻¹(I − e^{−Ht})Jᵀr0
        delta = np.linalg.solve(hess, (np.eye(P) - scipy.linalg.expm(-hess * t)) @ grad0)
        np.testing.assert_allclose(dyn.change[i], jac @ delta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dyn.delta_sq_norm[i], delta @ delta, rtol=1e-9, atol=1e-14)


def test_prox_gd_converges_to_krr():
    jac, gram, r0 = _problem(10)
    lam = 0.5
    eta = 0.5 * float(solve.stable_learning_rate(gram, lam))          # 1/(μ_max+λ)
    delta = _explicit_gd(jac, r0, lam, eta, [2000])[2000]
    alpha = _krr(gram, r0, lam)
    np.testing.assert_allclose(jac @ delta, gram @ alpha, rtol=1e-8, atol=1e-10)   # J δ_∞ = K(K+λI)⁻¹r0
    np.testing.assert_allclose(delta, jac.T @ alpha, rtol=1e-8, atol=1e-10)
    late = solve.gd_dynamics(gram, r0, lam, eta, 2000)
    np.testing.assert_allclose(late.change[0], gram @ alpha, rtol=1e-8, atol=1e-10)


def test_suggested_ridges_are_valid_inputs():
    """Every suggestion passed back as given (value and ridge_scale) solves: an indefinite K in trace units, and
    a zero K, for which trace units cannot express any ridge (no denormal suggestion)."""
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    indefinite = q @ np.diag([3.0, 1.0, 0.5, 0.2, -2.0]) @ q.T
    for gram in (indefinite, np.zeros((5, 5))):
        sol = solve.kernel_ridge(gram, np.ones(5), 0.0, ridge_scale="trace")
        assert sol.status == "not_psd" and sol.suggested_ridge >= 1e-8
        again = solve.kernel_ridge(gram, np.ones(5), sol.suggested_ridge, ridge_scale=sol.suggested_ridge_scale)
        assert again.status == "ok" and np.all(np.isfinite(again.value))
    assert "kernel K is zero" in sol.message and "ridge_scale='absolute'" in sol.message
    path = solve.ridge_path(np.zeros((5, 5)), np.ones(5), np.array([0.0, 1.0]), ridge_scale="trace")
    assert path.status == "not_psd" and "kernel K is zero" in path.message


def test_traced_bad_inputs_come_back_as_statuses():
    """Under a caller's jit the input checks cannot raise: NaN/inf give "not_finite", asymmetry "not_symmetric"."""
    _, gram, y = _problem(9)
    nan_y = np.where(np.arange(N) == 3, np.nan, y)
    skew = gram + 0.1 * np.triu(gram, 1)
    krr = jax.jit(solve.kernel_ridge)
    assert krr(gram, y, 0.1).status == "ok"
    assert krr(gram, nan_y, 0.1).status == "not_finite" and "NaN" in krr(gram, nan_y, 0.1).message
    assert krr(skew, y, 0.1).status == "not_symmetric"
    assert jax.jit(solve.ridge_path)(gram, nan_y, jnp.array([0.1, 1.0])).status == "not_finite"
    assert jax.jit(solve.gd_dynamics)(skew, y, 0.1, 0.01, jnp.arange(3)).status == "not_symmetric"
    cg = jax.jit(lambda b: solve.conjugate_gradient(lambda v: gram @ v, b, 0.1))
    assert cg(y).status == "ok" and cg(nan_y).status == "not_finite"


def test_rounding_asymmetry_is_accepted_per_dtype():
    _, gram, y = _problem(10)
    noise = 1e-7 * np.triu(gram, 1)  # relative asymmetry ~5e-8: below both tolerances
    assert solve.kernel_ridge(gram + noise, y, 0.1).status == "ok"
    noise32 = (3e-5 * np.triu(gram, 1)).astype(np.float32)  # relative ~1e-5: refused as float64, not float32
    assert solve.kernel_ridge(gram.astype(np.float32) + noise32, y, 0.1).status == "ok"
    with pytest.raises(ValueError, match=r"not symmetric: .* > 1e-06"):
        solve.kernel_ridge(gram + noise32.astype(np.float64), y, 0.1)
