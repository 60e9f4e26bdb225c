"""jaxlin.spectrum against numpy on kernels of known spectrum."""
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin.spectrum import (PAPER_TRACE_SIGMAS, STATISTICS, as_matrix, condition_numbers, hutchinson_trace,
                             kernel_statistics, lanczos_extreme_eigenvalues, ridge_terms, sign_kernel_stats,
                             spectrum_stats)
from jaxlin._util import to_jsonable


def known_psd(n, mu, seed):
    """Q diag(μ) Qᵀ with a random orthogonal Q."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * mu) @ q.T


@pytest.mark.parametrize("n", [13, 17])
def test_spectrum_stats_known_spectrum(n):
    mu = np.geomspace(1e-3, 5.0, n)
    gram_nn = known_psd(n, mu, seed=n)
    stats = spectrum_stats(gram_nn)
    np.testing.assert_allclose(stats["eigenvalues"], mu[::-1], rtol=1e-9, atol=1e-12)
    assert stats["eigenvalues"].dtype == np.float64 and stats["n"] == n
    np.testing.assert_allclose(stats["mu_max"], 5.0, rtol=1e-10)
    np.testing.assert_allclose(stats["mu_min"], 1e-3, rtol=1e-8)
    np.testing.assert_allclose(stats["kappa_sigma"], 5e3, rtol=1e-8)
    np.testing.assert_allclose(stats["trace"], mu.sum(), rtol=1e-12)
    p = mu / mu.sum()
    np.testing.assert_allclose(stats["effective_rank"], np.exp(-np.sum(p * np.log(p))), rtol=1e-9)
    np.testing.assert_allclose(stats["stable_rank"], mu.sum() / 5.0, rtol=1e-9)
    np.testing.assert_allclose(stats["cumulative_energy"], np.cumsum(p[::-1]), rtol=1e-9)
    assert stats["asymmetry"] < 1e-14 and stats["num_negative"] == 0

    absolute = spectrum_stats(gram_nn, 1e-2)
    np.testing.assert_allclose(absolute["kappa_sigma"], (5.0 + 1e-2) / (1e-3 + 1e-2), rtol=1e-9)
    relative = spectrum_stats(gram_nn, 1e-2, sigma_scale="trace")
    sigma_abs = 1e-2 * mu.sum() / n
    np.testing.assert_allclose(relative["sigma"], sigma_abs, rtol=1e-12)
    np.testing.assert_allclose(relative["kappa_sigma"], (5.0 + sigma_abs) / (1e-3 + sigma_abs), rtol=1e-9)


def test_four_d_equals_reshaped_two_d():
    n_ex, n_out = 7, 3  # (N, N, O, O) read example-major
    jac = np.random.default_rng(0).normal(size=(n_ex, n_out, 11))
    gram_nnoo = np.einsum("icp,jdp->ijcd", jac, jac)
    gram_2d = jac.reshape(n_ex * n_out, 11) @ jac.reshape(n_ex * n_out, 11).T
    np.testing.assert_allclose(as_matrix(gram_nnoo), gram_2d, rtol=1e-13, atol=1e-13)
    exact_nnoo = gram_2d.reshape(n_ex, n_out, n_ex, n_out).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(as_matrix(exact_nnoo), gram_2d)
    a, b = spectrum_stats(gram_nnoo, 1e-3), spectrum_stats(gram_2d, 1e-3)
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-12, atol=1e-12)
    assert a["kappa_sigma"] == pytest.approx(b["kappa_sigma"], rel=1e-9) and a["n"] == 21


def test_singular_and_negative_conventions():
    gram_nn = known_psd(13, np.r_[np.ones(12), 0.0], seed=1)
    stats = spectrum_stats(gram_nn)
    assert stats["mu_min"] < 1e-14
    assert math.isinf(stats["kappa_sigma"]) or stats["kappa_sigma"] > 1e13
    neg = spectrum_stats(np.diag([2.0, 1.0, -1e-3]))
    assert neg["mu_min"] == -1e-3 and neg["num_negative"] == 1
    assert math.isinf(neg["kappa_sigma"])
    np.testing.assert_allclose(neg["stable_rank"], 1.5)  # clipped: (2 + 1)/2
    asym = spectrum_stats(np.array([[1.0, 0.5], [0.0, 1.0]]))
    np.testing.assert_allclose(asym["asymmetry"], np.sqrt(0.5) / np.linalg.norm([[1, 0.5], [0, 1]]))
    np.testing.assert_allclose(asym["eigenvalues"], [1.25, 0.75])


@pytest.mark.parametrize("bad,match", [(np.ones((3, 4)), "shape"), (np.ones((2, 3, 2, 3)), r"\(N, N, O, O\)"),
                                       (np.full((2, 2), np.nan), "non-finite")])
def test_bad_kernels(bad, match):
    with pytest.raises(ValueError, match=match):
        spectrum_stats(bad)


def test_bad_sigma():
    with pytest.raises(ValueError, match="sigma_scale"):
        spectrum_stats(np.eye(3), 1e-4, sigma_scale="relative")
    with pytest.raises(ValueError, match="sigma=-1"):
        spectrum_stats(np.eye(3), -1.0)


def test_sign_kernel_stats_vs_svd():
    rng = np.random.default_rng(2)
    jac = rng.normal(size=(17, 40))
    gram_sign = jac @ np.sign(jac).T
    stats = sign_kernel_stats(gram_sign, 1e-2, sigma_scale="trace")
    s = np.linalg.svd(gram_sign, compute_uv=False)
    np.testing.assert_allclose(stats["singular_values"], s, rtol=1e-10)
    np.testing.assert_allclose(stats["nuclear_norm"], s.sum(), rtol=1e-12)
    sigma_abs = 1e-2 * s.sum() / 17
    np.testing.assert_allclose(stats["sigma"], sigma_abs)
    np.testing.assert_allclose(stats["kappa_sigma"], (s[0] + sigma_abs) / (s[-1] + sigma_abs), rtol=1e-9)
    np.testing.assert_allclose(stats["stable_rank"], s.sum() / s[0], rtol=1e-10)
    p = s / s.sum()
    np.testing.assert_allclose(stats["effective_rank"], np.exp(-np.sum(p * np.log(p))), rtol=1e-10)
    np.testing.assert_allclose(stats["trace"], np.trace(gram_sign))
    np.testing.assert_allclose(stats["asymmetry"],
                               np.linalg.norm(gram_sign - gram_sign.T) / np.linalg.norm(gram_sign))
    assert stats["asymmetry"] > 0.01
    np.testing.assert_allclose(stats["symmetric_eigenvalues"],
                               np.sort(np.linalg.eigvalsh((gram_sign + gram_sign.T) / 2))[::-1], atol=1e-10)


def test_condition_numbers_grid():
    mu = np.linspace(0.1, 3.0, 13)
    gram_nn = known_psd(13, mu, seed=3)
    out = condition_numbers(gram_nn, PAPER_TRACE_SIGMAS, sigma_scale="trace")
    sig = np.array(PAPER_TRACE_SIGMAS) * mu.sum() / 13
    np.testing.assert_allclose(out["sigma_absolute"], sig, rtol=1e-12)
    np.testing.assert_allclose(out["kappa_sigma"], (3.0 + sig) / (0.1 + sig), rtol=1e-9)
    single = condition_numbers(gram_nn, [1e-4], sigma_scale="absolute")["kappa_sigma"][0]
    assert single == pytest.approx(spectrum_stats(gram_nn, 1e-4)["kappa_sigma"], rel=1e-12)


class LanczosTest(chex.TestCase):
    """Pure JAX: the same estimates with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_lanczos_extreme_eigenvalues(self):
        mu = np.geomspace(0.05, 20.0, 31)
        gram_nn = jnp.asarray(known_psd(31, mu, seed=4))
        lanczos = lambda matvec, n, num_iters: self.variant(  # noqa: E731
            lambda key: lanczos_extreme_eigenvalues(matvec, n, num_iters=num_iters, key=key))
        top, bottom = lanczos(lambda v: gram_nn @ v, 31, 31)(jax.random.PRNGKey(0))
        np.testing.assert_allclose([top, bottom], [20.0, 0.05], rtol=1e-8)
        top12, bottom12 = lanczos(lambda v: gram_nn @ v, 31, 12)(jax.random.PRNGKey(1))
        assert abs(top12 - 20.0) < 1e-3 * 20.0  # the top converges first
        assert 0.05 - 1e-12 <= bottom12 <= 3.0  # Ritz values stay inside the spectrum
        # breakdown: Krylov space of the identity is 1-D, the restart keeps T = V K Vᵀ
        top_i, bottom_i = lanczos(lambda v: 2.0 * v, 9, 9)(jax.random.PRNGKey(2))
        np.testing.assert_allclose([top_i, bottom_i], [2.0, 2.0], rtol=1e-12)
        with pytest.raises(ValueError, match="num_iters=32"):
            lanczos(lambda v: v, 31, 32)(jax.random.PRNGKey(0))


def test_hutchinson_trace():
    gram_nn = jnp.asarray(known_psd(31, np.geomspace(0.05, 20.0, 31), seed=5))
    exact = float(jnp.trace(gram_nn))
    fn = jax.jit(lambda key: hutchinson_trace(lambda v: gram_nn @ v, 31, num_samples=4000, key=key))
    for seed in range(3):
        est, se = fn(jax.random.PRNGKey(seed))
        assert 0 < se < 0.05 * exact
        assert abs(est - exact) < 4 * se
    with pytest.raises(ValueError, match="num_samples=1"):
        hutchinson_trace(lambda v: v, 31, num_samples=1, key=jax.random.PRNGKey(0))


def test_to_jsonable():
    stats = spectrum_stats(np.diag([1.0, 0.0]))
    out = to_jsonable({"s": stats, "t": (np.float32(1.5), jnp.arange(2)), "x": [-math.inf, math.nan]})
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["s"]["kappa_sigma"] == "inf" and back["x"] == ["-inf", "nan"]
    assert back["t"] == [1.5, [0, 1]] and back["s"]["eigenvalues"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="object"):
        to_jsonable(object())


def test_kernel_statistics_names_and_sigma_conventions():
    mu = np.array([4.0, 2.0, 1.0, 0.5])
    gram_NNOO = np.diag(mu).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3)  # example-major (N·O × N·O) = diag(μ)
    resid0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    stats = kernel_statistics(gram_NNOO, resid0, sigma_absolute=0.1, sigma_trace=0.2, ridge_trace=0.5)
    assert tuple(stats) == STATISTICS
    sig_trace, ridge = 0.2 * mu.sum() / 4, 0.5 * mu.sum() / 4
    expected = {"kappa": 8.0, "kappa_sigma_abs": 4.1 / 0.6, "kappa_sigma_trace": (4 + sig_trace) / (0.5 + sig_trace),
                "mu_min": 0.5, "mu_max": 4.0, "trace": 7.5, "stable_rank": 7.5 / 4.0,
                "ridge_objective": 0.5 * ridge * (1 / (4 + ridge) + 1 / (0.5 + ridge)),
                "kappa_traced": 6.0 / 1.5}  # traced (N × N) = diag(4 + 2, 1 + 0.5)
    chex.assert_trees_all_close({name: stats[name] for name in expected}, expected, rtol=1e-12)
    assert "ridge_objective" not in kernel_statistics(gram_NNOO, resid0, kernel="sign")
    with pytest.raises(ValueError, match="kernel='jtj'"):
        kernel_statistics(gram_NNOO, kernel="jtj")


def test_ridge_terms_against_dense_formulas():
    n_ex, n_out = 5, 3  # (N, O) residuals flatten example-major, like the (N, N, O, O) kernel
    jac = np.random.default_rng(6).normal(size=(n_ex, n_out, 11))
    gram_NNOO = np.einsum("icp,jdp->ijcd", jac, jac)
    resid0_NO = np.random.default_rng(7).normal(size=(n_ex, n_out))
    mat, r0, lam = as_matrix(gram_NNOO), resid0_NO.reshape(-1), 0.37
    inv = np.linalg.inv(mat + lam * np.eye(15))
    objective, residual_norm = ridge_terms(gram_NNOO, resid0_NO, lam)
    np.testing.assert_allclose(objective, 0.5 * lam * r0 @ inv @ r0, rtol=1e-10)
    np.testing.assert_allclose(residual_norm, np.linalg.norm(lam * inv @ r0), rtol=1e-10)
    with pytest.raises(ValueError, match="resid0 has 14 entries"):
        ridge_terms(gram_NNOO, np.ones(14), lam)
