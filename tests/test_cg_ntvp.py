"""Conjugate gradients on (K + λI)α = r with K only available as NTK-vector products of a real model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import testing
from jaxlin.adapters import add_lora
from jaxlin.linearize import linearize_at
from jaxlin.module_ntk import module_ntks
from jaxlin.solve import conjugate_gradient, kernel_ridge


@pytest.mark.slow  # end to end: CG through NTK-vector products of a tiny BERT against the formed kernel
def test_cg_with_ntk_vector_products_equals_cholesky_on_the_formed_kernel():
    model = testing.tiny_model("bert", task="classification", num_labels=3, dtype=jnp.float64)
    ad = add_lora(model, rank=3, head=True)
    batch = {k: jnp.asarray(v) for k, v in testing.random_batch(model, batch=7, length=6).items()}
    f = ad.as_function()
    lin = linearize_at(f, ad.trainable, batch)
    rhs = jax.random.normal(jax.random.key(0), lin.f0.shape, jnp.float64)  # (N, O)
    ridge = 0.1
    matvec = lambda v: lin.ntk_vector_product(v.reshape(lin.f0.shape)).reshape(-1)  # noqa: E731
    sol = jax.jit(lambda r: conjugate_gradient(matvec, r, ridge, tol=1e-12, max_iters=60))(rhs.reshape(-1))
    assert sol.status == "ok", sol.message
    gram = sum(module_ntks(ad, batch, trace_axes=()).values())  # (N, N, O, O)
    want = kernel_ridge(gram, np.asarray(rhs), ridge).value
    np.testing.assert_allclose(np.asarray(sol.value).reshape(rhs.shape), want, rtol=1e-8, atol=1e-10)
