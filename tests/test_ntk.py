"""empirical_ntk_fn / estimate_memory against a dense reference: jacrev on raveled params, J1 J2ᵀ in float64.

Sizes are distinct so transposes cannot hide: N1 = 7, N2 = 5, O = 3, P = 102 (MLP) / 161 (token model).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlin import ntk as ntk_mod
from jaxlin import testing
from jaxlin._util import per_example
from jaxlin.ntk import (MemoryEstimate, available_memory, choose_implementation, empirical_ntk,
                        empirical_ntk_fn, estimate_memory)

IMPLS = ["jacobian_contraction", "ntk_vector_products", "auto"]


@functools.cache
def _setup(name):
    return testing.toy_problem(name)


_JACS = {}


def _dense_jac(f, params, x):  # (N, O, P), cached per (f, x) object
    key = (f, id(x))
    if key not in _JACS:
        flat, unravel = ravel_pytree(params)
        _JACS[key] = (x, np.asarray(jax.jit(jax.jacrev(lambda p: f(unravel(p), x)))(flat)))
    return _JACS[key][1]


def dense_ntk(f, params, x1, x2, full, sign=False):
    j1, j2 = _dense_jac(f, params, x1), _dense_jac(f, params, x2)
    if sign:
        j2 = j2 / (np.abs(j2) + 1e-8)
    return np.einsum("aip,bjp->abij", j1, j2) if full else np.einsum("aip,bip->ab", j1, j2)


@pytest.mark.parametrize("model", ["mlp", "token"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_equals_dense_reference(model, impl):
    f, params, x1, x2 = _setup(model)
    for trace_axes, full in (((-1,), False), ((), True)):
        for vmap_axes in (0, None):
            ntk = jax.jit(empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=vmap_axes, implementation=impl))
            k = ntk(x1, x2, params)
            assert k.shape == ((7, 5, 3, 3) if full else (7, 5))
            np.testing.assert_allclose(k, dense_ntk(f, params, x1, x2, full), rtol=1e-11, atol=1e-11)
        k_sym = ntk(x1, None, params)
        np.testing.assert_allclose(k_sym, dense_ntk(f, params, x1, x1, full), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("impl", IMPLS)
def test_symmetric_psd_and_mean_reduce(impl):
    f, params, x1, _ = _setup("token")
    full = empirical_ntk_fn(f, trace_axes=(), implementation=impl)(x1, None, params)
    mat = np.asarray(full).transpose(0, 2, 1, 3).reshape(21, 21)  # (N·O, N·O)
    np.testing.assert_allclose(mat, mat.T, rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(mat).min() > -1e-10
    k_sum = empirical_ntk_fn(f, implementation=impl)(x1, None, params)
    k_mean = empirical_ntk_fn(f, implementation=impl, reduce="mean")(x1, None, params)
    np.testing.assert_allclose(k_mean, k_sum / 3, rtol=1e-13)
    np.testing.assert_allclose(k_sum, np.einsum("abii->ab", full), rtol=1e-12)


@pytest.mark.parametrize("model", ["mlp", "token"])
def test_sign_kernel_equals_dense_reference(model):
    f, params, x1, x2 = _setup(model)
    for trace_axes, full in (((-1,), False), ((), True)):
        ntk = jax.jit(empirical_ntk_fn(f, trace_axes=trace_axes, implementation="jacobian_contraction",
                                       kernel="sign"))
        np.testing.assert_allclose(ntk(x1, x2, params), dense_ntk(f, params, x1, x2, full, sign=True),
                                   rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(ntk(x1, None, params), dense_ntk(f, params, x1, x1, full, sign=True),
                                   rtol=1e-11, atol=1e-11)
    with pytest.raises(ValueError, match="jacobian_contraction"):
        empirical_ntk_fn(f, implementation="ntk_vector_products", kernel="sign")


def test_accumulate_dtype_float32_inputs():
    f, params, x1, x2 = _setup("mlp")
    p32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), params), x1.astype(jnp.float32)
    k = empirical_ntk_fn(f, implementation="jacobian_contraction", accumulate_dtype=jnp.float64)(x32, None, p32)
    assert k.dtype == jnp.float64
    np.testing.assert_allclose(k, dense_ntk(f, params, x1, x1, False), rtol=1e-4)


def test_bad_inputs_raise_value_errors():
    f, params, x1, x2 = _setup("mlp")
    with pytest.raises(ValueError, match="'bogus'.*jacobian_contraction"):
        empirical_ntk_fn(f, implementation="bogus")
    with pytest.raises(ValueError, match="reduce"):
        empirical_ntk_fn(f, reduce="max")
    with pytest.raises(ValueError, match="kernel"):
        empirical_ntk_fn(f, kernel="rbf")
    with pytest.raises(ValueError, match="vmap_axes"):
        empirical_ntk_fn(f, vmap_axes=1)
    for bad in ((0,), (2,), (-2,), (1, -1)):
        with pytest.raises(ValueError, match="trace_axes"):
            empirical_ntk_fn(f, trace_axes=bad)(x1, x2, params)
    with pytest.raises(ValueError, match="leading"):
        empirical_ntk_fn(testing.toy_token)({"input_ids": jnp.zeros((7, 4), int), "attention_mask": jnp.ones((6, 4))},
                                None, _setup("token")[1])
    with pytest.raises(ValueError, match="module_ntks"):
        empirical_ntk_fn(f, implementation="structured")(x1, x2, params)
    with pytest.raises(ValueError, match="block_size=None"):
        empirical_ntk(f, params, x1, vmap_axes=None, block_size=3)


def test_structured_hook_is_a_registry(monkeypatch):
    f, params, x1, x2 = _setup("mlp")
    monkeypatch.setattr(ntk_mod, "_IMPLEMENTATIONS", dict(ntk_mod._IMPLEMENTATIONS))  # restored after the test
    ntk_mod.register_implementation("structured", lambda f, spec: lambda a, b, p: jnp.full((7, 5), 2.0))
    np.testing.assert_array_equal(empirical_ntk_fn(f, implementation="structured")(x1, x2, params), 2.0)
    with pytest.raises(ValueError, match="other than 'auto'"):
        ntk_mod.register_implementation("auto", lambda f, spec: None)
    with pytest.raises(TypeError, match="callable"):
        ntk_mod.register_implementation("mine", None)


def test_jitted_ntk_does_not_retrace():
    f, params, x1, x2 = _setup("token")
    for impl in ("jacobian_contraction", "ntk_vector_products"):
        chex.clear_trace_counter()  # chex counts traces per code object, shared by every empirical_ntk_fn
        ntk = jax.jit(chex.assert_max_traces(empirical_ntk_fn(f, trace_axes=(), implementation=impl), n=1))
        ntk(x1, x2, params)
        other = jax.tree.map(lambda a: a[::-1], x1)  # same shapes, other values: a retrace would raise
        ntk(other, x2, jax.tree.map(lambda a: a * 1.1, params))


def test_empirical_ntk_blocked_glue():
    f, params, x1, x2 = _setup("token")
    for bs in (3, None):
        np.testing.assert_allclose(empirical_ntk(f, params, x1, None, block_size=bs, trace_axes=()),
                                   dense_ntk(f, params, x1, x1, True), rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(empirical_ntk(f, params, x1, x2, block_size=bs, kernel="sign"),
                                   dense_ntk(f, params, x1, x2, False, sign=True), rtol=1e-11, atol=1e-11)


def test_choose_implementation_rule():
    f, params, x1, x2 = _setup("token")
    assert choose_implementation(f, params, x1, x2) == "jacobian_contraction"  # T = 4 tokens: jvps cost more
    assert choose_implementation(f, params, x1, x2, max_jacobian_bytes=0) == "ntk_vector_products"


@pytest.mark.slow  # compiles each implementation to read its memory; choose_implementation is checked fast
@pytest.mark.parametrize("impl", ["jacobian_contraction", "ntk_vector_products"])
def test_estimate_memory_matches_actual_bytes(impl):
    f, params, x1, x2 = _setup("token")
    jac = lambda x: jax.vmap(lambda xi: jax.jacrev(per_example(f))(params, xi))(x)  # noqa: E731
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))  # noqa: E731
    for trace_axes in ((-1,), ()):
        sub1, sub2 = jax.tree.map(lambda a: a[:3], x1), jax.tree.map(lambda a: a[:3], x2)
        kernel = empirical_ntk(f, params, x1, x2, trace_axes=trace_axes, implementation=impl)
        tile = empirical_ntk_fn(f, trace_axes=trace_axes, implementation=impl)(sub1, sub2, params)
        est = estimate_memory(f, params, x1, x2, implementation=impl, trace_axes=trace_axes, block_size=3)
        assert est.kernel_bytes == kernel.nbytes and est.tile_bytes == tile.nbytes
        expected = nbytes(jac(sub2)) if impl == "ntk_vector_products" else nbytes(jac(sub1)) + nbytes(jac(sub2))
        assert est.jacobian_bytes == expected
    sym = estimate_memory(f, params, x1, None, implementation="jacobian_contraction")
    assert sym.jacobian_bytes == nbytes(jac(x1))
    assert est.total_bytes == est.jacobian_bytes + est.tile_bytes + est.kernel_bytes
    assert est.fits(est.total_bytes) and not est.fits(est.total_bytes - 1) and est.fits(None) is None
    assert "KiB" in str(est) and impl in str(est)
    assert isinstance(est, MemoryEstimate)
    avail = available_memory()
    assert avail is None or avail > 0
