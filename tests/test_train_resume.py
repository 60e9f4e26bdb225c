"""jaxlin.train.fit with checkpoint_dir: an interrupted run, run again, ends exactly where an uninterrupted one does.

A bag-of-words classifier (logits = masked mean of w[token] + b, C = 4) in float64: 2 epochs of 3 batches, an
evaluation after each epoch, the selective pull (whose per-step "fired" statistics are part of the result).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlin.testing import random_batch
from jaxlin.train import TrainConfig, fit

CONFIG = TrainConfig(learning_rate=0.05, epochs=2, regularizer="selective", strength=0.5)
VOCAB, C = 211, 4


def _bag_of_words(trainable, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m = mask[..., None].astype(trainable["w"].dtype)
    return (trainable["w"][ids] * m).sum(1) / m.sum(1) + trainable["b"]


def _theta0(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(VOCAB, C))), "b": jnp.zeros(C)}


def _batches(epoch):
    out = []
    for k in range(3):
        seed = 100 * epoch + k
        b = random_batch(VOCAB, batch=8, length=9, seed=seed)
        labels = np.random.default_rng(seed).integers(0, C, 8).astype(np.int32)
        out.append({**b, "labels": labels, "example_mask": np.ones(8, np.float32)})
    return out


def _eval_batches():
    return _batches(7)[:2]


class Preempted(Exception):
    pass


def _stop_at(step):
    def callback(done, metrics):
        if done == step:
            raise Preempted(f"step {step}")
    return callback


def _run(theta0, **kw):
    return fit(_bag_of_words, theta0, _batches, config=kw.pop("config", CONFIG), eval_batches_fn=_eval_batches,
               progress=False, **kw)


def _assert_same_run(got, want):
    assert got.train_loss == want.train_loss
    assert got.regularizer_info == want.regularizer_info and got.eval_history == want.eval_history
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(want.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("every, stop", [(2, 5), (3, 4)])  # mid-epoch, and right after an epoch's last batch
def test_interrupted_run_resumes_on_the_same_trajectory(tmp_path, every, stop):
    theta0 = _theta0()
    want = _run(theta0)
    assert want.steps == 6 and len(want.eval_history) == 2 and want.regularizer_info["fired"]
    with pytest.raises(Preempted):
        _run(theta0, checkpoint_dir=tmp_path, checkpoint_every=every, callback=_stop_at(stop))
    steps = []
    got = _run(theta0, checkpoint_dir=tmp_path, checkpoint_every=every, callback=lambda s, m: steps.append(s))
    assert got.resumed_from == (stop // every) * every and steps == list(range(got.resumed_from + 1, 7))
    _assert_same_run(got, want)
    again = _run(theta0, checkpoint_dir=tmp_path, checkpoint_every=every, callback=_stop_at(1))
    assert again.resumed_from == 6  # a finished run is read back, not trained again
    _assert_same_run(again, want)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    _run(_theta0(), checkpoint_dir=tmp_path, config=dataclasses.replace(CONFIG, epochs=1))
    with pytest.raises(ValueError, match=r"holds a checkpoint of another run \(its key differs in \['config', "
                                         r"'total_steps'\]\)"):
        _run(_theta0(), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"differs in \['trainable0'\]"):
        _run(_theta0(seed=1), checkpoint_dir=tmp_path, config=dataclasses.replace(CONFIG, epochs=1))
    with pytest.raises(ValueError, match=r"differs in \['checkpoint_key'\]"):
        _run(_theta0(), checkpoint_dir=tmp_path, config=dataclasses.replace(CONFIG, epochs=1),
             checkpoint_key="seed 2")


def test_sharded_run_resumes_with_its_shardings(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    theta0 = {"w": jax.device_put(_theta0()["w"], NamedSharding(mesh, P(None, "model"))),
              "b": jax.device_put(_theta0()["b"], NamedSharding(mesh, P()))}
    want = _run(theta0, mesh=mesh)
    with pytest.raises(Preempted):
        _run(theta0, mesh=mesh, checkpoint_dir=tmp_path, checkpoint_every=2, callback=_stop_at(3))
    got = _run(theta0, mesh=mesh, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert got.resumed_from == 2
    _assert_same_run(got, want)
    assert got.trainable["w"].sharding.is_equivalent_to(theta0["w"].sharding, 2)
    assert not got.trainable["w"].sharding.is_fully_replicated
