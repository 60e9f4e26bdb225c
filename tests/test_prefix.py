"""Frozen prefixes (jaxlin.prefix): training and evaluating from the lowest trained block equals the whole model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin.adapters import add_lora, adapt
from jaxlin.prefix import PREFIX_KEY, frozen_prefix
from jaxlin.testing import random_batch, tiny_model
from jaxlin.train import TrainConfig, fit, linearized_function

TARGETS = {"bert": ("query", "value"), "roberta": ("query",), "gpt2": ("c_attn",)}


def _adapted(family, layers=None, **kw):
    m = tiny_model(family, task="classification", num_labels=3, dtype=jnp.float64)
    layers = (m.num_layers - 1,) if layers is None else layers
    return add_lora(m, targets=TARGETS.get(family, ("q_proj", "v_proj")), layers=layers, head=True, **kw)


def _moved(trainable, scale=0.05):
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("family", ["bert", "gpt2", "mistral"])  # roberta, llama: the same loops
def test_from_the_prefix_equals_the_whole_model_with_gradients_and_linearization(family):
    adapted = _adapted(family)
    f = adapted.as_function()
    prefix = frozen_prefix(f, adapted.trainable)
    assert prefix.start_layer == adapted.model.num_layers - 1
    batch = {**random_batch(adapted.model, 7, 13, seed=3), "labels": np.arange(7) % 3}
    attached = prefix.attach(batch)
    assert attached[PREFIX_KEY].shape[:2] == (7, 13) and not attached[PREFIX_KEY][batch["attention_mask"] == 0].any()
    theta = _moved(adapted.trainable)
    np.testing.assert_allclose(prefix.function(theta, attached), f(theta, batch), rtol=1e-12, atol=1e-13)
    lin, lin_p = (linearized_function(g, adapted.trainable) for g in (f, prefix.function))
    np.testing.assert_allclose(lin_p(theta, attached), lin(theta, batch), rtol=1e-12, atol=1e-13)
    grad = jax.grad(lambda t, g, b: jnp.sum(jnp.sin(g(t, b))))
    for a, b in zip(jax.tree.leaves(grad(theta, prefix.function, attached)), jax.tree.leaves(grad(theta, f, batch))):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_a_fit_from_the_prefix_follows_the_whole_model():
    adapted = _adapted("llama", layers=(1, 2))
    f = adapted.as_function()
    prefix = frozen_prefix(f, adapted.trainable)
    assert prefix.start_layer == 1
    batches = [{**random_batch(adapted.model, 4, 11, seed=i), "labels": np.arange(4) % 3} for i in range(2)]
    config = TrainConfig(learning_rate=1e-2, steps=4, batch_size=4, regularizer="prox", strength=0.5)
    want = fit(f, adapted.trainable, lambda epoch: batches, config=config, progress=False)
    got = fit(prefix.function, adapted.trainable, lambda epoch: [prefix.attach(b) for b in batches], config=config,
              progress=False)
    np.testing.assert_allclose(got.train_loss, want.train_loss, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert prefix.num_cached == len({b["input_ids"][i, :b["attention_mask"][i].sum()].tobytes()
                                     for b in batches for i in range(4)})


def test_an_example_is_computed_once_and_serves_any_padded_length():
    adapted = _adapted("bert")
    prefix = frozen_prefix(adapted.as_function(), adapted.trainable)
    batch = random_batch(adapted.model, 5, 17, seed=1)  # real lengths 17 … 3
    short = {k: v[2:, :12] for k, v in batch.items()}  # the three shortest, padded to 12 only
    wide = prefix.attach(batch)
    cached = dict(prefix._rows)
    narrow = prefix.attach(short)
    assert prefix._rows.keys() == cached.keys()  # nothing new was computed
    np.testing.assert_array_equal(narrow[PREFIX_KEY], wide[PREFIX_KEY][2:, :12])
    assert prefix.cached_bytes == sum(batch["attention_mask"].sum(1)) * 36 * 8  # real tokens × D × float64
    chunked = frozen_prefix(adapted.as_function(), adapted.trainable, length=23, rows=2)  # 3 forwards of 2 × 23
    np.testing.assert_allclose(chunked.attach(batch)[PREFIX_KEY], wide[PREFIX_KEY], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"rows=0\): both must be ≥ 1"):
        frozen_prefix(adapted.as_function(), adapted.trainable, rows=0)


def test_the_first_trained_block_follows_what_trains_and_the_gate():
    m = tiny_model("bert", task="classification", num_labels=3, dtype=jnp.float64)
    assert add_lora(m, targets=("query",), layers=(1, 2)).first_trained_layer() == 1
    assert adapt(m, head=True).first_trained_layer() == m.num_layers  # only the head: every block is frozen
    assert add_lora(m, targets=("query",), layers=(2,), biases=True).first_trained_layer() == 0  # embedding norm
    assert adapt(m, layers=(2,)).first_trained_layer() == 2
    every = add_lora(m, targets=("query", "value"))
    gate = [float(name.startswith("layer2")) for name in every.lora_modules]
    assert every.first_trained_layer() == 0 and every.first_trained_layer(gate) == 2
    assert frozen_prefix(every.as_function(), every.trainable) is None  # block 0 trains: nothing to cache
    gated = frozen_prefix(every.as_function(gate=gate), every.trainable)
    assert gated.start_layer == 2 and gated.function.gate_M is not None
    assert frozen_prefix(lambda t, b: b, every.trainable) is None  # not an adapted model's function


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_prefix_runs_on_from_a_lower_blocks_rows(family):
    """A prefix given ``below`` (a lower block's prefix of the same model) computes its rows from below's, missing
    ones computed there first, and equals the prefix from the embeddings."""
    m = tiny_model(family, task="classification", num_labels=3, dtype=jnp.float64)
    every = add_lora(m, targets=TARGETS.get(family, ("q_proj", "v_proj")), head=True)
    gate = lambda block: [float(n.startswith(f"layer{block}")) for n in every.lora_modules]  # noqa: E731
    f1, f2 = (every.as_function(gate=gate(k)) for k in (1, 2))
    batch = random_batch(m, 5, 13, seed=4)
    low = frozen_prefix(f1, every.trainable, length=16, rows=3)
    low.attach({k: v[:2] for k, v in batch.items()})  # two examples cached below; three will be missing there
    high = frozen_prefix(f2, every.trainable, length=16, rows=3, below=low)
    got = high.attach(batch)[PREFIX_KEY]
    assert low.num_cached == 5 and high.num_cached == 5
    want = frozen_prefix(f2, every.trainable, length=16, rows=3).attach(batch)[PREFIX_KEY]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="ending below block 1"):
        frozen_prefix(f1, every.trainable, below=high)


def test_left_padding_and_a_missing_hidden_state_are_refused():
    adapted = _adapted("gpt2")
    prefix = frozen_prefix(adapted.as_function(), adapted.trainable)
    with pytest.raises(ValueError, match="needs right-padded batches"):
        prefix.attach(random_batch(adapted.model, 3, 9, padding_side="left"))
    batch = random_batch(adapted.model, 3, 9)
    with pytest.raises(ValueError, match=r"start_layer=1 needs the hidden states entering that block"):
        adapted.apply(adapted.trainable, adapted.frozen, batch["input_ids"], batch["attention_mask"], start_layer=1)
    with pytest.raises(ValueError, match=r"stop_layer=5 must lie in \[0, 2\]"):
        adapted.apply(adapted.trainable, adapted.frozen, batch["input_ids"], batch["attention_mask"], stop_layer=5)
    assert dataclasses.replace(prefix.function, start_layer=0)(adapted.trainable, batch).shape == (3, 3)
