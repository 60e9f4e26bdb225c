"""linearize / linearize_at against a dense reference: jacrev on raveled params, float64."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlin import testing
from jaxlin.linearize import linearize, linearize_at


def _setup(name):
    f, params, x, _ = testing.toy_problem(name)
    return f, params, x


def _direction(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape))


def _add(params, d, a=1.0):
    return jax.tree.map(lambda p, t: p + a * t, params, d)


def _dense_jac(f, params, x):  # (N·O, P)
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacrev(lambda p: f(unravel(p), x)))(flat)
    return np.asarray(jac).reshape(-1, flat.size)


@pytest.fixture(params=["mlp", "token"])
def setup(request):
    return _setup(request.param)


def test_f_lin_equals_f_at_params0_and_is_affine(setup):
    f, params0, x = setup
    f_lin = jax.jit(linearize(f, params0))
    f0 = f(params0, x)
    np.testing.assert_allclose(f_lin(params0, x), f0, rtol=0, atol=1e-14)
    d = _direction(params0, 1)
    step = f_lin(_add(params0, d), x) - f0
    for a in (-2.0, 0.37, 5.0):
        np.testing.assert_allclose(f_lin(_add(params0, d, a), x) - f0, a * step, rtol=1e-11, atol=1e-11)


def test_f_lin_matches_central_difference_and_dense_jacobian(setup):
    f, params0, x = setup
    d = _direction(params0, 2)
    eps = 1e-6
    fd = (f(_add(params0, d, eps), x) - f(_add(params0, d, -eps), x)) / (2 * eps)
    lin = linearize(f, params0)(_add(params0, d), x) - f(params0, x)
    np.testing.assert_allclose(lin, fd, rtol=1e-7, atol=1e-7)
    dense = _dense_jac(f, params0, x) @ np.asarray(ravel_pytree(d)[0])
    np.testing.assert_allclose(np.asarray(lin).ravel(), dense, rtol=1e-12, atol=1e-12)


def test_gradient_through_f_lin_is_jacobian_transpose(setup):
    f, params0, x = setup
    f_lin = linearize(f, params0)
    ct = jax.random.normal(jax.random.PRNGKey(3), f(params0, x).shape)
    theta = _add(params0, _direction(params0, 4), 0.3)  # gradient is the same at any θ: f_lin is affine
    grad = jax.jit(jax.grad(lambda p: jnp.vdot(ct, f_lin(p, x))))(theta)
    (vjp_ref,) = jax.vjp(lambda p: f(p, x), params0)[1](ct)
    chex.assert_trees_all_close(grad, vjp_ref, rtol=1e-12, atol=1e-12)
    dense = _dense_jac(f, params0, x).T @ np.asarray(ct).ravel()
    np.testing.assert_allclose(ravel_pytree(grad)[0], dense, rtol=1e-12, atol=1e-12)


def test_linearize_at_products_equal_dense_products(setup):
    f, params0, x = setup
    lb = linearize_at(f, params0, x)
    jac = _dense_jac(f, params0, x)
    np.testing.assert_allclose(lb.f0, f(params0, x), rtol=0, atol=1e-14)
    d = _direction(params0, 5)
    np.testing.assert_allclose(np.asarray(lb.jvp(d)).ravel(), jac @ ravel_pytree(d)[0], rtol=1e-12, atol=1e-12)
    ct = jax.random.normal(jax.random.PRNGKey(6), lb.f0.shape)
    vjp = lb.vjp(ct)
    assert jax.tree.structure(vjp) == jax.tree.structure(params0)
    np.testing.assert_allclose(ravel_pytree(vjp)[0], jac.T @ np.asarray(ct).ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lb.ntk_vector_product(ct)).ravel(), jac @ (jac.T @ np.asarray(ct).ravel()),
                               rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(lb.f_lin(_add(params0, d)), linearize(f, params0)(_add(params0, d), x),
                               rtol=1e-12, atol=1e-12)


def test_f_lin_does_not_retrace_on_same_shapes():
    f, params0, x = _setup("mlp")
    chex.clear_trace_counter()  # chex counts traces per function footprint, kept across tests
    f_lin = jax.jit(linearize(chex.assert_max_traces(f, n=1), params0))  # f traced once, in one jvp
    f_lin(params0, x)
    f_lin(_add(params0, _direction(params0, 7)), x + 1.0)  # same shapes, other values: a retrace would raise
