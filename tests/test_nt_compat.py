"""jaxlin's kernels against neural-tangents 0.6.5 (through jaxlin._nt_compat) on an MLP and a 2-layer
attention-like model. Skipped when neural-tangents is not installed."""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import _nt_compat
from jaxlin.ntk import empirical_ntk_fn

HAVE_NT = importlib.util.find_spec("neural_tangents") is not None
needs_nt = pytest.mark.skipif(not HAVE_NT, reason=f"neural-tangents not installed ({_nt_compat.INSTALL})")


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def attention(params, x):
    """Two softmax self-attention layers over (N, L, D) inputs, mean-pooled, then a dense head: (N, O)."""
    h = x
    for layer in params["layers"]:
        q, k, v = h @ layer["q"], h @ layer["k"], h @ layer["v"]
        a = jax.nn.softmax(jnp.einsum("nld,nmd->nlm", q, k) / np.sqrt(h.shape[-1]), axis=-1)
        h = h + jnp.einsum("nlm,nmd->nld", a, v)
    return jnp.tanh(h.mean(1)) @ params["head"] + params["bias"]


def _setup(name):
    k = jax.random.split(jax.random.PRNGKey(0), 12)
    if name == "mlp":  # P = 102
        params = {"w1": jax.random.normal(k[0], (5, 11)) / 2.2, "b1": 0.1 * jax.random.normal(k[1], (11,)),
                  "w2": jax.random.normal(k[2], (11, 3)) / 3.3, "b2": 0.1 * jax.random.normal(k[3], (3,))}
        return mlp, params, jax.random.normal(k[4], (7, 5)), jax.random.normal(k[5], (5, 5))
    d = 4  # P = 2·3·16 + 4·3 + 3 = 111
    layers = [{n: jax.random.normal(k[3 * i + j], (d, d)) / 2 for j, n in enumerate("qkv")} for i in range(2)]
    params = {"layers": layers, "head": jax.random.normal(k[6], (d, 3)) / 2, "bias": jnp.zeros(3)}
    return attention, params, jax.random.normal(k[7], (7, 6, d)), jax.random.normal(k[8], (5, 6, d))


@needs_nt
@pytest.mark.slow  # neural-tangents is an oracle; the dense references of test_ntk check the kernels fast
@pytest.mark.parametrize("model", ["mlp", "attention"])
@pytest.mark.parametrize("impl", ["jacobian_contraction", "ntk_vector_products"])
def test_jaxlin_matches_neural_tangents(model, impl):
    f, params, x1, x2 = _setup(model)
    for trace_axes, reduce, b in (((), "sum", x2), ((), "sum", None), ((-1,), "mean", x2), ((-1,), "sum", None)):
        nt = jax.jit(_nt_compat.nt_empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0, implementation=impl,
                                                    reduce=reduce))
        ours = jax.jit(empirical_ntk_fn(f, trace_axes=trace_axes, implementation=impl, reduce=reduce))
        np.testing.assert_allclose(ours(x1, b, params), nt(x1, b, params), rtol=1e-11, atol=1e-11)
    via = empirical_ntk_fn(f, trace_axes=(), implementation="neural_tangents", accumulate_dtype=jnp.float64)
    np.testing.assert_allclose(via(x1, x2, params), empirical_ntk_fn(f, trace_axes=())(x1, x2, params),
                               rtol=1e-11, atol=1e-11)


@needs_nt
@pytest.mark.slow  # imports neural-tangents, an oracle only
def test_nt_convention_is_mean_and_bad_implementation_raises():
    f, params, x1, x2 = _setup("mlp")
    nt_mean = _nt_compat.nt_empirical_ntk_fn(f, reduce="mean")(x1, x2, params)
    nt_sum = _nt_compat.nt_empirical_ntk_fn(f)(x1, x2, params)
    np.testing.assert_allclose(nt_sum, 3 * nt_mean, rtol=1e-13)
    assert _nt_compat.load_neural_tangents() is _nt_compat.load_neural_tangents()
    with pytest.raises(ValueError, match="structured"):
        _nt_compat.nt_empirical_ntk_fn(f, implementation="structured_derivatives")


def test_missing_neural_tangents_names_the_install_command(monkeypatch):
    monkeypatch.setattr(_nt_compat, "_MODULE", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps neural-tangents==0.6.5 frozendict"):
        _nt_compat.load_neural_tangents()


def test_core_modules_never_import_neural_tangents():
    code = ("import sys, jaxlin.ntk, jaxlin.gram, jaxlin.linearize, jaxlin._nt_compat; "
            "assert 'neural_tangents' not in sys.modules, 'imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-2000:]
