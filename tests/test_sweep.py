"""jaxlin.sweep: the λ sweep on a tiny model with synthetic text, and log-log slopes; on a device mesh of the 8
simulated CPU devices (tests/conftest.py) it equals one device."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from tiers import tiered
from word_tokenizer import sentiment_data, word_tokenizer

from jaxlin import label_word_readout, sharding
from jaxlin.adapters import LoRA, adapt, add_lora
from jaxlin.next_token import NextTokenObjective, completions_from_labels
from jaxlin.data import TextDataset
from jaxlin._util import loglog_slope
from jaxlin.sweep import DISTANCE_KEYS, lambda_sweep, sweep_summary
from jaxlin.testing import tiny_model
from jaxlin.train import TrainConfig


class WordTokenizer:
    """<s> word ids </s>, one id per word (3 + its index in a fixed vocabulary), like RoBERTa's specials."""

    pad_token_id = 1
    padding_side = "right"

    def __init__(self, words):
        self.ids = {w: 3 + i for i, w in enumerate(words)}

    def encode_unpadded(self, texts, max_length):
        return [([0] + [self.ids[w] for w in t.split()] + [2])[:max_length] for t in texts]


def _dataset(n, seed, words):
    """Texts of 2–6 words; label = which of words[0:3] occurs most (ties to the lowest), so it is learnable."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        text = rng.choice(words, size=rng.integers(2, 7))
        texts.append(" ".join(text))
        labels.append(int(np.argmax([np.sum(text == w) for w in words[:3]])))
    return TextDataset(tuple(texts), np.array(labels), ("a", "b", "c"), name=f"synthetic{seed}", source="test")


def test_loglog_slope_recovers_power_laws():
    lambdas = [0.1, 1.0, 10.0, 100.0]
    for exponent in (-0.5, -1.5, 2.0):
        assert loglog_slope(lambdas, [3.0 * lam ** exponent for lam in lambdas]) == pytest.approx(exponent)
    # λ = 0, zero, negative, None and inf values are skipped; fewer than two points give nan
    assert loglog_slope([0.0, 1.0, 4.0, 9.0], [5.0, 2.0, 1.0, -1.0]) == pytest.approx(-0.5)
    assert math.isnan(loglog_slope([1.0, 2.0], [1.0, None]))
    assert math.isnan(loglog_slope([1.0, 1.0], [1.0, 2.0]))


def test_sweep_summary_slopes_per_distance():
    lambdas = [0.0, 0.1, 1.0, 10.0]
    results = [{"lambda": lam, "variant": "prox", "theorem2_radius": None if lam == 0 else lam ** -0.5,
                **{key: 2.0 * (lam or 1e-3) ** -1.0 for key in DISTANCE_KEYS}} for lam in lambdas]
    summary = sweep_summary(results)
    assert summary["lambdas"] == lambdas and summary["variant"] == "prox"
    assert summary["slopes"] == {key: pytest.approx(-1.0) for key in DISTANCE_KEYS}
    assert summary["theorem2_radius_slope"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="lambda_sweep"):
        sweep_summary([])


@pytest.mark.slow  # end to end: fine-tunes a tiny transformer for every λ, nonlinear and linearized
def test_lambda_sweep_on_tiny_model():
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=2)
    adapted = add_lora(model, targets=("query", "value"), rank=2, head=True)
    words = np.array([f"w{i}" for i in range(40)])
    tokenizer = WordTokenizer(words)
    train, ev = _dataset(24, 0, words), _dataset(10, 1, words)
    # sgd with ηλ ≤ 1: δ ← (1 − ηλ)δ − ηg, so a larger λ keeps θ closer to θ0 at every step; max_length 8 = one L
    cfg = TrainConfig(learning_rate=0.1, epochs=3, batch_size=8, optimizer="sgd", schedule="constant",
                      warmup_ratio=0.0, max_length=8)
    lambdas = [0.1, 1.0, 10.0]
    results = lambda_sweep(adapted, train, ev, tokenizer, lambdas=lambdas, config=cfg, progress=False)

    expected = {"lambda", "regularizer", "anchor", "variant", "theta_distance_to_init",
                "theta_distance_to_init_linearized", "theta_distance_lin_nonlin", "output_distance_lin_nonlin_train",
                "output_distance_lin_nonlin_eval", "kl_nonlin_lin", "agreement", "eval_accuracy_nonlinear",
                "eval_accuracy_linearized", "train_loss_nonlinear", "train_loss_linearized", "loss_curve_nonlinear",
                "loss_curve_linearized", "theorem2_radius", "relative_module_distances", "wall_time_s"}
    for r in results:
        assert expected <= set(r)
        assert r["variant"] == {**r["variant"], "loss": "cross_entropy", "regularizer": "prox", "anchor": "init",
                                "optimizer": "sgd"}
        assert len(r["loss_curve_nonlinear"]) == len(r["loss_curve_linearized"]) == 9
        assert r["loss_curve_nonlinear"][0] == pytest.approx(r["loss_curve_linearized"][0])  # same θ0, same batch
        for key in DISTANCE_KEYS:
            assert np.isfinite(r[key]) and r[key] >= 0, (key, r[key])
        assert r["theorem2_radius"] == pytest.approx(math.sqrt(2 * r["init_train_loss_mean"] / r["lambda"]))
        assert set(r["relative_module_distances"]["nonlinear"]) == set(adapted.modules)
        assert 0 <= r["agreement"] <= 1
    for key in ("theta_distance_to_init", "theta_distance_to_init_linearized"):
        values = [r[key] for r in results]
        assert values[0] > values[1] > values[2], (key, values)
    assert results[0]["theta_distance_lin_nonlin"] > 0

    summary = sweep_summary(results)
    assert summary["theorem2_radius_slope"] == pytest.approx(-0.5)
    assert summary["slopes"]["theta_distance_to_init"] < 0
    text = json.dumps({"results": results, "summary": summary})
    assert json.loads(text)["results"][2]["lambda"] == 10.0

    # measuring the train-set quantities on the first 8 examples changes no trajectory, only what is measured
    sub = lambda_sweep(adapted, train, ev, tokenizer, lambdas=[1.0], config=cfg, progress=False,
                       num_train_evaluated=8)[0]
    assert sub["num_train_evaluated"] == 8 and results[1]["num_train_evaluated"] == sub["num_train"] == 24
    for key in ("theta_distance_to_init", "theta_distance_lin_nonlin", "output_distance_lin_nonlin_eval",
                "eval_accuracy_nonlinear", "eval_loss_linearized"):
        assert sub[key] == pytest.approx(results[1][key], rel=1e-6), key
    assert sub["init_train_loss_mean"] != pytest.approx(results[1]["init_train_loss_mean"], rel=1e-9)
    with pytest.raises(ValueError, match="num_train_evaluated=25"):
        lambda_sweep(adapted, train, ev, tokenizer, lambdas=[1.0], config=cfg, num_train_evaluated=25)


def test_a_sweep_from_its_frozen_prefix_equals_the_whole_model():
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=2, dtype=jnp.float64)
    adapted = add_lora(model, targets=("query", "value"), layers=(1,), rank=2, head=True)
    words = np.array([f"w{i}" for i in range(40)])
    kw = dict(train_data=_dataset(16, 0, words), eval_data=_dataset(10, 1, words), tokenizer=WordTokenizer(words),
              lambdas=[1.0], config=TrainConfig(learning_rate=0.05, epochs=1, batch_size=8, warmup_ratio=0.0,
                                                max_length=8), progress=False)
    got, want = (lambda_sweep(adapted, **kw, frozen_prefix=on)[0] for on in (True, False))
    assert got["prefix_start_layer"] == 1 and want["prefix_start_layer"] == 0
    for key in ("theta_distance_to_init", "theta_distance_lin_nonlin", "output_distance_lin_nonlin_eval",
                "kl_nonlin_lin", "eval_loss_nonlinear", "eval_loss_linearized", "loss_curve_linearized",
                "loss_curve_nonlinear", "init_train_loss_mean"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)


@pytest.fixture(scope="module")
def small_sweep():
    """A one-layer LoRA RoBERTa with a trained head, float32, and its single-device sweep at one λ."""
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=1)
    adapted = add_lora(model, targets=("query", "value"), rank=2, head=True)
    words = np.array([f"w{i}" for i in range(40)])
    data = dict(train_data=_dataset(16, 0, words), eval_data=_dataset(10, 1, words), tokenizer=WordTokenizer(words),
                lambdas=[1.0], config=TrainConfig(learning_rate=0.05, epochs=1, batch_size=8, warmup_ratio=0.0,
                                                   max_length=8), progress=False)
    return adapted, data, lambda_sweep(adapted, **data)[0]


@pytest.mark.parametrize(*tiered("shape", [(4, 2), (8, 1), (2, 4), (1, 8)], fast=[(4, 2)]))
def test_sweep_on_a_mesh_equals_one_device(small_sweep, shape):
    adapted, data, want = small_sweep
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
    placed = sharding.shard_adapted(adapted, mesh)  # by the rules: the LoRA B factors over model where it divides
    split = any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed.trainable))
    assert split == (shape[1] in (2, 4))  # the tiny widths do not divide 8
    got = lambda_sweep(placed, **data, mesh=mesh)[0]
    assert got.keys() == want.keys()
    assert want["theta_distance_lin_nonlin"] > 0 and want["loss_curve_nonlinear"][-1] != want["init_train_loss_mean"]
    for key, value in want.items():
        if key in ("wall_time_s", "variant", "regularizer", "anchor", "objective"):
            continue
        if "accuracy" in key or "agreement" in key or key.startswith("num_"):
            assert got[key] == value, key
        elif key == "relative_module_distances":
            for name in value:
                assert got[key][name] == pytest.approx(value[name], rel=1e-5), name
        else:
            np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)


def test_sweep_refuses_a_mesh_without_its_data_axis(small_sweep):
    adapted, data, _ = small_sweep
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("rows", "model"))
    with pytest.raises(ValueError, match="data_axis='data' is not an axis of the mesh"):
        lambda_sweep(adapted, **data, mesh=mesh)


@pytest.mark.slow  # a second objective through the same mesh path: trains two models of a tiny Llama twice
def test_next_token_sweep_on_a_mesh_equals_one_device():
    """The next-token objective's evaluate takes no mesh: in one process it trains on the mesh and evaluates with
    the parameters where they are, on whole batches; the numbers are one device's."""
    tok = word_tokenizer()
    readout = label_word_readout(tok, ["bad", "good"], template="Review: {text} Sentiment:")
    model = tiny_model("llama", task="causal_lm", dtype=jnp.float64, num_hidden_layers=1)
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj"), rank=2, init="gaussian"))
    train, ev = (completions_from_labels(sentiment_data(n, seed=s), readout) for n, s in ((8, 0), (4, 1)))
    kw = dict(lambdas=[1.0], config=TrainConfig(learning_rate=1e-2, steps=2, batch_size=4, max_length=16,
                                                pad_to_multiple_of=16, warmup_ratio=0.0),
              objective=NextTokenObjective(), progress=False)
    want = lambda_sweep(adapted, train, ev, tok, **kw)[0]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    got = lambda_sweep(sharding.shard_adapted(adapted, mesh), train, ev, tok, mesh=mesh, **kw)[0]
    assert want["theta_distance_lin_nonlin"] > 0
    for key in ("theta_distance_to_init", "theta_distance_lin_nonlin", "kl_nonlin_lin", "eval_loss_nonlinear",
                "train_loss_linearized", "loss_curve_nonlinear", "loss_curve_linearized"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
    assert got["eval_accuracy_nonlinear"] == want["eval_accuracy_nonlinear"] and got["agreement"] == want["agreement"]
