"""jaxlin.train on a device mesh: the same losses and parameters as one device, shardings kept, one compile.

8 simulated CPU devices (tests/conftest.py), meshes over ("data", "model"). A tiny random Llama (2 layers) with
LoRA rank 2 on q_proj and v_proj and a trained head, in float64; its LoRA B factors and head kernel are sharded
over "model" where the width divides (the rest replicated), as a rules table would place them, and batches of 8
examples are split over "data".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.tree_util import Partial

from jaxlin import train_mesh
from jaxlin.adapters import add_lora
from jaxlin.testing import random_batch, tiny_model
from jaxlin.train import TrainConfig, evaluate, fit, make_optimizer, model_functions

CONFIG = TrainConfig(learning_rate=2e-2, steps=3, warmup_ratio=0.0, regularizer="prox", strength=0.1)


@pytest.fixture(scope="module")
def adapted():
    model = tiny_model("llama", task="classification", num_labels=3, dtype=jnp.float64, num_hidden_layers=2)
    return add_lora(model, targets=("q_proj", "v_proj"), rank=2, head=True)


@pytest.fixture(scope="module")
def batches(adapted):
    out = []
    for seed in (1, 2, 3):
        b = random_batch(adapted.model, batch=8, length=11, seed=seed)
        labels = np.random.default_rng(seed).integers(0, 3, 8).astype(np.int32)
        out.append({**b, "labels": labels, "example_mask": np.array([1] * 7 + [0], np.float32)})
    return out


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


def _sharded(tree, mesh):
    """Each 2-D leaf's last axis over "model" when its width divides, every other leaf replicated."""
    def spec(x):
        return P(None, "model") if x.ndim == 2 and x.shape[1] % mesh.shape["model"] == 0 else P()

    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)


@pytest.fixture(scope="module")
def one_device(adapted, batches):
    return {name: fit(fn, adapted.trainable, lambda e: batches, config=CONFIG, progress=False)
            for name, fn in zip(("nonlinear", "linearized"), model_functions(adapted))}


def _check_mesh_run(adapted, batches, one_device, shape):
    mesh = _mesh(shape)
    theta0 = _sharded(adapted.trainable, mesh)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(theta0)) == (shape[1] > 1)
    for name, fn in zip(("nonlinear", "linearized"), model_functions(adapted)):
        ref = one_device[name]
        res = fit(fn, theta0, lambda e: batches, config=CONFIG, progress=False, mesh=mesh)
        np.testing.assert_allclose(res.train_loss, ref.train_loss, rtol=1e-10)
        assert res.train_loss[-1] != ref.train_loss[0]
        for got, want, start in zip(jax.tree.leaves(res.trainable), jax.tree.leaves(ref.trainable),
                                    jax.tree.leaves(theta0)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)
            assert got.sharding.is_equivalent_to(start.sharding, got.ndim), (name, got.sharding, start.sharding)
        # Adam's moments (and the prox anchor) are sharded like their parameter
        expected = train_mesh.MeshPlan(mesh).opt_state_shardings(res.opt_state, theta0,
                                                                 jax.tree.map(lambda x: x.sharding, theta0))
        for leaf, want in zip(jax.tree.leaves(res.opt_state), jax.tree.leaves(expected)):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
        split_params = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(theta0))
        split_state = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(res.opt_state))
        assert split_state >= 2 * split_params


def test_three_steps_on_a_4x2_mesh_equal_one_device(adapted, batches, one_device):
    _check_mesh_run(adapted, batches, one_device, (4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_three_steps_on_other_meshes_equal_one_device(adapted, batches, one_device, shape):
    _check_mesh_run(adapted, batches, one_device, shape)


def test_second_fit_and_evaluate_on_a_mesh_compile_nothing(adapted, batches):
    """Same model, optimiser object and layout: the step and the evaluation forward are traced once."""
    traces = []

    def counted(frozen, trainable, batch):
        traces.append(1)
        return adapted.apply(trainable, frozen, batch["input_ids"], batch["attention_mask"])

    apply_fn = Partial(counted, adapted.frozen)
    mesh = _mesh((4, 2))
    theta0 = _sharded(adapted.trainable, mesh)
    opt = make_optimizer(CONFIG, 3)
    runs = [fit(apply_fn, theta0, lambda e: batches, config=CONFIG, optimizer=opt, progress=False, mesh=mesh,
                eval_batches_fn=lambda: batches[:2]) for _ in range(2)]
    assert len(traces) == 2, len(traces)  # one step, one evaluation forward
    assert runs[0].train_loss == runs[1].train_loss
    ev = evaluate(apply_fn, runs[0].trainable, batches, mesh=mesh)
    ref = evaluate(apply_fn, jax.device_get(runs[0].trainable), batches)
    assert len(traces) == 3  # the single-device forward; the mesh one was reused
    np.testing.assert_allclose(ev["logits"], ref["logits"], rtol=1e-10)
    assert ev["logits"].shape == (21, 3) and ev["accuracy"] == ref["accuracy"]


def test_mesh_errors_name_the_axis_and_the_batch(adapted, batches):
    apply_fn, _ = model_functions(adapted)
    with pytest.raises(ValueError, match="data_axis='rows' is not an axis of the mesh"):
        fit(apply_fn, adapted.trainable, lambda e: batches, config=CONFIG, progress=False, mesh=_mesh((4, 2)),
            data_axis="rows")
    odd = [{k: v[:6] for k, v in b.items()} for b in batches]
    with pytest.raises(ValueError, match="a batch of 6 examples does not split over mesh axis 'data' of size 4"):
        fit(apply_fn, adapted.trainable, lambda e: odd, config=CONFIG, progress=False, mesh=_mesh((4, 2)))


@pytest.mark.slow
def test_float32_on_a_2x4_mesh_within_float32_rounding(batches):
    model = tiny_model("llama", task="classification", num_labels=3, dtype=jnp.float32, num_hidden_layers=2)
    ad = add_lora(model, targets=("q_proj", "v_proj"), rank=2, head=True)
    apply_fn, _ = model_functions(ad)
    mesh = _mesh((2, 4))
    ref = fit(apply_fn, ad.trainable, lambda e: batches, config=CONFIG, progress=False)
    res = fit(apply_fn, _sharded(ad.trainable, mesh), lambda e: batches, config=CONFIG, progress=False, mesh=mesh)
    np.testing.assert_allclose(res.train_loss, ref.train_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(res.trainable), jax.tree.leaves(ref.trainable)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_custom_loss_on_a_mesh_gets_every_array_split_over_data(batches):
    """fit(loss_fn=) on a mesh: an extra per-example array is split over "data" with the rest; same numbers."""
    rng = np.random.default_rng(0)
    theta0 = {"w": jnp.asarray(rng.normal(size=(97, 4))), "b": jnp.zeros(4)}
    mesh = _mesh((4, 2))

    def weighted(trainable, b):
        m = b["attention_mask"][..., None].astype(trainable["w"].dtype)
        logits = (trainable["w"][b["input_ids"]] * m).sum(1) / m.sum(1) + trainable["b"]
        per = -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), b["labels"]]
        return jnp.sum(b["weight_B"] * per) / jnp.sum(b["weight_B"]), {}

    data = [{**b, "weight_B": np.linspace(0.5, 2.0, 8)} for b in batches]
    kw = dict(config=CONFIG, progress=False, loss_fn=weighted, eval_batches_fn=lambda: data[:1])
    ref = fit(None, theta0, lambda e: data, **kw)
    res = fit(None, _sharded(theta0, mesh), lambda e: data, mesh=mesh, **kw)
    assert not res.trainable["w"].sharding.is_fully_replicated
    np.testing.assert_allclose(res.train_loss, ref.train_loss, rtol=1e-12)
    assert res.eval_history[-1]["loss"] == pytest.approx(ref.eval_history[-1]["loss"], rel=1e-12)
