"""linearize / linearize_at against a dense reference: jacrev on raveled params, float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlin.linearize import linearize, linearize_at


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def token(params, x):
    h = params["emb"][x["input_ids"]]
    m = x["attention_mask"][..., None].astype(h.dtype)
    h = (h * m).sum(1) / m.sum(1)
    return jnp.tanh(h @ params["w"] + params["b"]) @ params["v"] + params["c"]


def _setup(name):
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    if name == "mlp":  # P = 5·11 + 11 + 11·3 + 3 = 102, N = 7, O = 3
        params = {"w1": jax.random.normal(k[0], (5, 11)) / 2.2, "b1": 0.1 * jax.random.normal(k[1], (11,)),
                  "w2": jax.random.normal(k[2], (11, 3)) / 3.3, "b2": 0.1 * jax.random.normal(k[3], (3,))}
        return mlp, params, jax.random.normal(k[4], (7, 5))
    params = {"emb": jax.random.normal(k[0], (13, 6)), "w": jax.random.normal(k[1], (6, 8)) / 2.4,  # P = 161
              "b": 0.1 * jax.random.normal(k[5], (8,)), "v": jax.random.normal(k[2], (8, 3)) / 2.8,
              "c": 0.1 * jax.random.normal(k[3], (3,))}
    lens = 1 + np.arange(7) % 4
    x = {"input_ids": jax.random.randint(k[4], (7, 4), 0, 13),
         "attention_mask": jnp.asarray((np.arange(4)[None] < lens[:, None]).astype(np.int32))}
    return token, params, x


def _direction(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape))


def _add(params, d, a=1.0):
    return jax.tree.map(lambda p, t: p + a * t, params, d)


def _dense_jac(f, params, x):  # (N·O, P)
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda p: f(unravel(p), x))(flat)
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
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(vjp_ref)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
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
    traces = []

    def counted(params, inputs):
        traces.append(1)
        return f(params, inputs)

    f_lin = jax.jit(linearize(counted, params0))
    f_lin(params0, x)
    f_lin(_add(params0, _direction(params0, 7)), x + 1.0)
    assert len(traces) == 1
