"""The linearity probe against exact answers (linear, quadratic models) and dense jacrev references; on a device
mesh of the 8 simulated CPU devices (tests/conftest.py) it equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from tiers import tiered

from jaxlin import data, probe, sharding
from jaxlin.adapters import add_lora
from jaxlin.probe import linearity_probe, probe_adapted, random_unit_directions
from jaxlin.testing import random_batch, tiny_model

N, O = 5, 3  # examples, outputs; params P = 7 (w: (3,), m: (2, 2))
RADII = [0.1, 1.0, 7.0]


def _params():
    k = jax.random.split(jax.random.key(3), 2)
    return {"w": jax.random.normal(k[0], (3,)), "m": jax.random.normal(k[1], (2, 2))}


def linear(params, x):
    return x["a"] @ params["w"] + jnp.einsum("nopq,pq->no", x["b"], params["m"])


def quadratic(params, x):
    """f(θ)_{n,o} = ½ θᵀ A_{no} θ + c_{no}·θ (A symmetric), so J(θ) − J(θ0) = A (θ − θ0) exactly."""
    theta = ravel_pytree(params)[0]
    return 0.5 * jnp.einsum("nopq,p,q->no", x["A"], theta, theta) + x["c"] @ theta


def _inputs():
    k = jax.random.split(jax.random.key(5), 4)
    a = jax.random.normal(k[0], (N, O, 7, 7))
    return {"a": jax.random.normal(k[1], (N, O, 3)),
            "b": jax.random.normal(k[2], (N, O, 2, 2)), "A": a + a.transpose(0, 1, 3, 2),
            "c": jax.random.normal(k[3], (N, O, 7))}


def _seeded(params, seed, num_directions, num_tangents):
    key_dirs, key_tans = jax.random.split(jax.random.key(seed))
    flat = lambda t: np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(t))  # noqa: E731
    return (flat(random_unit_directions(key_dirs, params, num_directions)),
            flat(random_unit_directions(key_tans, params, num_tangents)))


def _dense_jac(f, params, x):
    flat0, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacrev(lambda p: f(unravel(p), x)))
    return flat0, lambda flat: np.asarray(jac(flat)).reshape(-1, flat0.size)  # (N·O, P)


def _dense_reference(f, params, x, radii, dirs_TP, tans_UP, n):
    """Per radius and direction: max_u ‖(J(θ)−J(θ0))u‖/r and max |K_θ − K_θ0|/r from dense jacrev."""
    flat0, jac = _dense_jac(f, params, x)
    j0 = jac(flat0)

    def kernel(j):  # traced K (N, N) from the (N·O, P) Jacobian
        j_NOP = j.reshape(n, -1, j.shape[1])
        return np.einsum("nop,mop->nm", j_NOP, j_NOP)

    jac_KT, ntk_KT = [], []
    for r in radii:
        js = [jac(flat0 + r * v) for v in dirs_TP]
        jac_KT.append([np.linalg.norm((j - j0) @ tans_UP.T, axis=0).max() / r for j in js])
        ntk_KT.append([np.abs(kernel(j) - kernel(j0)).max() / r for j in js])
    return np.array(jac_KT), np.array(ntk_KT)


def test_linear_model_is_exactly_linear():
    x = _inputs()
    out = linearity_probe(linear, _params(), x, radii=RADII, num_directions=4, num_tangents=3, ntk_entries=True)
    assert out["radii"] == RADII and set(out["estimates"]) == {"jacobian", "remainder", "ntk"}
    for name, est in out["estimates"].items():
        for key in ("L_avg", "L_upper", "L_std"):
            assert len(est[key]) == len(RADII)
            np.testing.assert_allclose(est[key], 0.0, atol=1e-12, err_msg=f"{name} {key}")
    np.testing.assert_allclose(out["estimates"]["remainder"]["mean_over_examples"], 0.0, atol=1e-12)


def test_quadratic_model_matches_dense_and_exact_remainder():
    params, x = _params(), _inputs()
    seed, t, u = 11, 6, 4
    out = linearity_probe(quadratic, params, x, radii=RADII, num_directions=t, num_tangents=u, seed=seed,
                          ntk_entries=True, chunk_size=4)  # 6 directions in chunks of 4: a ragged chunk
    dirs_TP, tans_UP = _seeded(params, seed, t, u)
    jac_KT, ntk_KT = _dense_reference(quadratic, params, x, RADII, dirs_TP, tans_UP, N)
    est = out["estimates"]
    np.testing.assert_allclose(est["jacobian"]["L_max"], jac_KT, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est["ntk"]["L_max"], ntk_KT, rtol=1e-10, atol=1e-12)
    # f(θ) − f_lin(θ) = ½ r² vᵀA_{no}v exactly, so the remainder / r² is the same at every radius
    vav_TNO = 0.5 * np.einsum("nopq,tp,tq->tno", np.asarray(x["A"]), dirs_TP, dirs_TP)
    rem_TN = np.linalg.norm(vav_TNO, axis=2)
    for k in range(len(RADII)):
        np.testing.assert_allclose(est["remainder"]["L_max"][k], rem_TN.max(1), rtol=1e-10)
        np.testing.assert_allclose(est["remainder"]["mean_over_examples"][k], rem_TN.mean(), rtol=1e-10)
    # for this model J(θ) − J(θ0) = r·A v, so the Jacobian estimate does not depend on r either
    np.testing.assert_allclose(jac_KT, np.broadcast_to(jac_KT[0], jac_KT.shape), rtol=1e-10)
    # aggregates are mean / max / std of the per-direction values
    for name in ("jacobian", "remainder", "ntk"):
        values = np.array(est[name]["L_max"])
        np.testing.assert_allclose(est[name]["L_avg"], values.mean(1), rtol=1e-14)
        np.testing.assert_allclose(est[name]["L_upper"], values.max(1), rtol=1e-14)
        np.testing.assert_allclose(est[name]["L_std"], values.std(1), rtol=1e-12)


def test_chunked_equals_vmapped_and_no_retrace_for_a_new_radius_grid():
    params, x = _params(), _inputs()
    traces = []

    def counted(p, batch):
        traces.append(1)
        return quadratic(p, batch)

    a = linearity_probe(counted, params, x, radii=[0.3, 2.0], num_directions=5, num_tangents=2)
    n_traces = len(traces)
    b = linearity_probe(counted, params, x, radii=[0.5, 3.0], num_directions=5, num_tangents=2)
    assert len(traces) == n_traces, "a second radius grid of the same shapes must not retrace f"
    c = linearity_probe(counted, params, x, radii=[0.3, 2.0], num_directions=5, num_tangents=2, chunk_size=2)
    for name in ("jacobian", "remainder"):
        np.testing.assert_allclose(c["estimates"][name]["L_max"], a["estimates"][name]["L_max"], rtol=1e-12)
    assert b["radii"] == [0.5, 3.0]
    n_traces = len(traces)
    # lipschitz_at_radius normalises its directions and tangents: scaled ones give the same estimates
    key_dirs, key_tans = jax.random.split(jax.random.key(0))
    scale = lambda t, s: jax.tree.map(lambda leaf: s * leaf, t)  # noqa: E731
    per_dir = probe.lipschitz_at_radius(counted, params, x, 0.3,
                                        scale(random_unit_directions(key_dirs, params, 5), 3.0),
                                        scale(random_unit_directions(key_tans, params, 2), 0.5))
    assert len(traces) == n_traces
    for name in ("jacobian", "remainder"):
        np.testing.assert_allclose(per_dir[name], a["estimates"][name]["L_max"][0], rtol=1e-12)


@pytest.fixture(scope="module")
def lora_bert():
    model = tiny_model("bert", task="classification", num_labels=3, dtype=jnp.float64)
    return add_lora(model, rank=2), random_batch(model, batch=3, length=7)


@pytest.mark.slow  # dense float64 Jacobians of a LoRA BERT at every radius
def test_lora_bert_matches_dense_jacobians(lora_bert):
    adapted, batch = lora_bert
    radii, seed, t, u = [0.05, 0.8], 2, 3, 2
    kw = dict(radii=radii, num_directions=t, num_tangents=u, seed=seed, ntk_entries=True)
    out = probe_adapted(adapted, batch, **kw)
    cache_size = probe._at_radius._cache_size()
    again = probe_adapted(adapted, batch, **kw)
    assert again["estimates"] == out["estimates"], "same seed must give identical estimates"
    probe_adapted(adapted, batch, **{**kw, "radii": [0.1, 0.3]})
    assert probe._at_radius._cache_size() == cache_size, "a new radius grid must not recompile"

    def f(trainable, x):
        return adapted.apply(trainable, adapted.frozen, x["input_ids"], x["attention_mask"])

    dirs_TP, tans_UP = _seeded(adapted.trainable, seed, t, u)
    jac_KT, ntk_KT = _dense_reference(f, adapted.trainable, batch, radii, dirs_TP, tans_UP, 3)
    est = out["estimates"]
    np.testing.assert_allclose(est["jacobian"]["L_max"], jac_KT, rtol=1e-8)
    np.testing.assert_allclose(est["ntk"]["L_max"], ntk_KT, rtol=1e-8)
    for name, e in est.items():
        assert np.all(np.isfinite(e["L_max"])) and np.all(np.array(e["L_max"]) > 0), name
        assert np.all(np.array(e["L_upper"]) >= np.array(e["L_avg"])), name
    assert out["settings"]["num_params"] == adapted.num_params() and out["settings"]["num_outputs"] == 3


def test_the_probe_from_a_frozen_prefix_equals_the_whole_model():
    model = tiny_model("llama", task="classification", num_labels=3, dtype=jnp.float64)
    adapted = add_lora(model, targets=("q_proj",), layers=(2,), rank=2)
    batch = random_batch(model, batch=4, length=9, seed=2)
    kw = dict(radii=[0.1, 1.0], num_directions=2, num_tangents=1, seed=3)
    got, want = (probe_adapted(adapted, batch, frozen_prefix=on, **kw) for on in (True, False))
    assert (got["prefix_start_layer"], want["prefix_start_layer"]) == (2, 0)
    for name, entry in want["estimates"].items():
        for key, values in entry.items():
            np.testing.assert_allclose(got["estimates"][name][key], values, rtol=1e-9, err_msg=f"{name} {key}")


def test_the_probe_on_parts_of_similar_length_equals_one_padded_batch():
    """The calibration batch in 2 parts, each padded to its own longest (jaxlin.data.pad_parts): the same
    estimates, run from a frozen prefix (whose rows are attached to each part; float64)."""
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=2, dtype=jnp.float64)
    adapted = add_lora(model, targets=("query", "value"), layers=(1,), rank=2)
    batch = random_batch(model, batch=5, length=17, seed=6, min_length=2)
    rows = [ids[mask == 1] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    _, parts = data.pad_parts(rows, np.ones(5, bool), pad_token_id=model.config.pad_token_id, pad_to_multiple_of=4,
                              padding_side="right", max_parts=2)
    assert [p["input_ids"].shape[1] for p in parts] == [8, 20]
    kw = dict(radii=[0.1, 1.0], num_directions=2, num_tangents=2, seed=3)
    got, want = (probe_adapted(adapted, b, **kw) for b in ({"parts": parts}, batch))
    assert got["settings"] == want["settings"] and got["prefix_start_layer"] == 1
    for name, entry in want["estimates"].items():
        for key, values in entry.items():
            np.testing.assert_allclose(got["estimates"][name][key], values, rtol=1e-9, err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def small_probe():
    """A one-layer LoRA RoBERTa in float64 (the remainder divides by r²), 8 examples, and its one-device probe."""
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=1, dtype=jnp.float64)
    adapted = add_lora(model, targets=("query", "value"), rank=2)
    batch = random_batch(model, batch=8, length=9, seed=1)
    kw = dict(radii=[0.05, 1.0], num_directions=3, num_tangents=2, seed=4)
    return adapted, batch, kw, probe_adapted(adapted, batch, **kw)


@pytest.mark.parametrize(*tiered("shape", [(4, 2), (8, 1), (2, 4), (1, 8)], fast=[(8, 1)]))
def test_probe_on_a_mesh_equals_one_device(small_probe, shape):
    adapted, batch, kw, want = small_probe
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
    got = probe_adapted(sharding.shard_adapted(adapted, mesh), batch, mesh=mesh, **kw)
    assert got["settings"] == want["settings"] and got["radii"] == want["radii"]
    assert got["estimates"].keys() == want["estimates"].keys() == {"jacobian", "remainder"}
    for name, entry in want["estimates"].items():
        assert np.all(np.array(entry["L_max"]) > 0), name
        for key, values in entry.items():
            np.testing.assert_allclose(got["estimates"][name][key], values, rtol=1e-9, err_msg=f"{name} {key}")


def test_bad_input_raises_clear_errors():
    params, x = _params(), _inputs()
    with pytest.raises(ValueError, match=r"radius -0.5 .*> 0"):
        linearity_probe(linear, params, x, radii=[0.1, -0.5])
    with pytest.raises(ValueError, match=r"radius 0.0 "):
        linearity_probe(linear, params, x, radii=[0.0])
    with pytest.raises(ValueError, match="non-empty"):
        linearity_probe(linear, params, x, radii=[])
    with pytest.raises(ValueError, match="num_directions=0"):
        linearity_probe(linear, params, x, radii=[1.0], num_directions=0)
    with pytest.raises(ValueError, match=r"unknown estimators \['hessian'\]; valid: \('jacobian', 'remainder'\)"):
        linearity_probe(linear, params, x, radii=[1.0], estimators=("jacobian", "hessian"))
    with pytest.raises(ValueError, match=r"N·O·P = 5·3·7 .*ntk_max_bytes.*estimators=\('jacobian',\)"):
        linearity_probe(linear, params, x, radii=[1.0], ntk_entries=True, ntk_max_bytes=1000)
