"""jaxlin.study: gated LoRA training (exactness, equivalence to a restricted adapter, one trace), configuration
statistics against summed module kernels, the JSON result and its correlations, selections. Tiny BERT, a
synthetic two-class data set and a fake whitespace tokenizer; every text has 6 words, so one padded length.
The model is float64: its tiny LoRA kernels are near-singular (κ ~ 1e5), so float32 tiles would blur μ_min."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlin import data
from jaxlin.adapters import add_lora
from jaxlin.module_ntk import module_ntks
from jaxlin.select import SCORES, configuration_kernel
from jaxlin.spectrum import STATISTICS, kernel_statistics, spectrum_stats
from jaxlin.stats import correlation, macro_f1
from jaxlin.study import (OUTCOMES, PREDICTORS, StudyConfig, gate_vector, krr_logits, krr_outcomes, run_study,
                          study_preset)
from jaxlin.testing import tiny_model
from jaxlin.train import TrainConfig, evaluate, fit, make_optimizer, model_functions
from tiers import tiered

WORDS = ("good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "plot", "was", "very")


class WordTokenizer:
    """[CLS]=1, one id per word (3 + its index in WORDS), [SEP]=2; pad 0."""

    pad_token_id = 0

    def encode_unpadded(self, texts, max_length):
        return [([1] + [3 + WORDS.index(w) for w in t.split()])[: max_length - 1] + [2] for t in texts]


def _dataset(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = [" ".join(rng.choice(WORDS[:3] if y else WORDS[3:6], 2).tolist() + rng.choice(WORDS[6:], 4).tolist())
             for y in labels]
    return data.TextDataset(tuple(texts), labels, ("neg", "pos"), name="toy", source="memory")


@pytest.fixture(scope="module")
def model():
    return tiny_model("bert", task="classification", num_labels=2, dtype=jnp.float64)


@pytest.fixture(scope="module")
def splits():
    return _dataset(40, 0), _dataset(16, 1)


def _config(**overrides):
    base = dict(configurations=("layer", "single"), seeds=(0, 1), num_calibration=6, num_calibration_large=10,
                rank=2, steps=3, batch_size=4, max_length=16, pad_to_multiple_of=8, num_train=16, num_eval=16,
                eval_batch_size=8, kernels=("ntk", "sign"), n_bootstrap=50, selection_budget=2,
                learning_rate=1e-2)
    return StudyConfig(**{**base, **overrides})


def _step_batches(dataset, n):
    return list(data.batches(dataset, WordTokenizer(), batch_size=4, max_length=16, shuffle=True))[:n]


def train_gated(adapted, trainable0, gate, batches, *, optimizer):
    """The study's training: `fit` of the gated model function with one ready optimiser, one step per batch."""
    res = fit(adapted.as_function(gate=gate), trainable0, lambda epoch: batches, config=TrainConfig(steps=len(batches)),
              optimizer=optimizer, progress=False)
    return res.trainable, res.train_loss


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_gated_training_freezes_inactive_modules_bit_exactly(model, splits):
    adapted = add_lora(model, rank=2, head=True)
    active = ("layer1.attention.query", "layer2.attention.value")
    gate = gate_vector(adapted, active)
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-2, steps=3, warmup_ratio=0.0), 3)
    theta, losses = train_gated(adapted, adapted.trainable, gate, _step_batches(splits[0], 3), optimizer=optimizer)
    before, after = _flat(adapted.trainable), _flat(theta)
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    for path, value in before.items():
        moved = not np.array_equal(after[path], value)
        if path[0] == "lora":
            assert moved == (path[1] in active), path  # A of an active module moves from step 2 (B0 = 0)
        else:
            assert moved, path  # the head trains
    with pytest.raises(ValueError, match="carry no LoRA adapter"):
        gate_vector(adapted, ("classifier",))


def test_the_study_asks_its_objective_what_it_trains(model):
    """One call, no dispatch on type: any objective with `study_functions` serves; the two built-in ones keep their
    refusals, the classification one gates the readout's function and reads its outputs, the next-token one gates
    the next-token logits and reads the label words' logits at each completion's first token."""
    from types import SimpleNamespace

    from jaxlin.next_token import NextTokenObjective
    from jaxlin.study import _study_objective
    from jaxlin.sweep import ClassificationObjective

    adapted = add_lora(model, rank=2)
    gate = gate_vector(adapted, adapted.lora_modules[:1])
    objective, gated, readout_logits = _study_objective(None, None, None)
    assert isinstance(objective, ClassificationObjective) and objective.output_fn is None
    np.testing.assert_array_equal(gated(adapted, gate).gate_M, gate)
    assert readout_logits({"outputs": "the logits"}) == "the logits"
    own = SimpleNamespace(name="own", study_functions=lambda tokenizer, output_fn: ("gated", "readout"))
    assert _study_objective(own, None, None) == (own, "gated", "readout")
    readout = SimpleNamespace(output_fn=lambda out, batch: out, token_ids=[1, 3])
    _, gated, readout_logits = _study_objective(NextTokenObjective(readout=readout), readout, readout.output_fn)
    found = {"outputs": np.arange(20.0).reshape(4, 5), "first_token": np.array([True, False, True, False])}
    np.testing.assert_array_equal(readout_logits(found), [[1.0, 3.0], [11.0, 13.0]])
    with pytest.raises(ValueError, match="task='causal_lm'"):  # the next-token logits of a causal LM
        gated(adapted, gate)
    with pytest.raises(ValueError, match=r"^run_study\(objective=ClassificationObjective\(.*\)\) reads other logits "
                                         r"than output_fn=None; pass objective=None"):
        _study_objective(ClassificationObjective(readout.output_fn), None, None)
    with pytest.raises(ValueError, match="pass tokenizer=readout, output_fn=readout.output_fn"):
        _study_objective(NextTokenObjective(), readout, readout.output_fn)
    with pytest.raises(TypeError, match="pass None, a ClassificationObjective or a NextTokenObjective"):
        _study_objective(object(), None, None)


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny BERT
def test_gate_equals_an_adapter_restricted_to_those_modules(model, splits):
    """Two SGD steps with gate g match `add_lora(targets=active)` trained by `fit`: same A0 (per module and seed)."""
    active = ("layer0.attention.key", "layer2.attention.query")
    full = add_lora(model, rank=2, seed=3, head=True)
    restricted = add_lora(model, targets=active, rank=2, seed=3, head=True)
    cfg = TrainConfig(learning_rate=0.05, steps=2, optimizer="sgd", schedule="constant", warmup_ratio=0.0)
    batches = _step_batches(splits[0], 2)
    theta, _ = train_gated(full, full.trainable, gate_vector(full, active), batches, optimizer=make_optimizer(cfg, 2))
    ref = fit(model_functions(restricted)[0], restricted.trainable, lambda e: batches, config=cfg, progress=False)
    got, want = _flat(theta), _flat(ref.trainable)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-7, err_msg=str(path))
    probe = _step_batches(splits[1], 1)
    logits = evaluate(full.as_function(gate=gate_vector(full, active)), theta, probe)["logits"]
    ref_logits = evaluate(model_functions(restricted)[0], ref.trainable, probe)["logits"]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny BERT
def test_one_trace_across_configurations_and_seeds(model, splits):
    traces = []
    adapters = [add_lora(model, rank=2, seed=s, head=True) for s in (0, 1)]
    run = adapters[0].run

    def counting_run(params, input_ids, attention_mask, **kwargs):
        traces.append(1)
        return run(params, input_ids, attention_mask, **kwargs)

    adapters[0] = dataclasses.replace(adapters[0], run=counting_run)
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-2, steps=2), 2)
    batches, probe = _step_batches(splits[0], 2), _step_batches(splits[1], 1)
    counts = []
    for seed in (0, 1):
        for active in (("layer0.attention.query",), ("layer1.attention.key", "layer1.attention.value"),
                       adapters[0].lora_modules):
            gate = gate_vector(adapters[0], active)
            theta, _ = train_gated(adapters[0], adapters[seed].trainable, gate, batches, optimizer=optimizer)
            evaluate(adapters[0].as_function(gate=gate), theta, probe)
            counts.append(len(traces))
    assert counts == [2] * 6  # one train step + one eval forward, traced for the first run only


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match=r"StudyConfig.steps=0 must be an integer in \[1, "):
        StudyConfig(steps=0)
    with pytest.raises(ValueError, match=r"StudyConfig.configurations=\('layers',\)"):
        StudyConfig(configurations=("layers",))
    with pytest.raises(ValueError, match=r"StudyConfig.num_calibration_large=16 must be None or an integer in \(32"):
        StudyConfig(num_calibration_large=16)
    with pytest.raises(ValueError, match="StudyConfig.kernels"):
        StudyConfig(kernels=("sign",))
    with pytest.raises(ValueError, match="StudyConfig.sigma_scale='relative' must be one of"):
        StudyConfig(sigma_scale="relative")
    with pytest.raises(ValueError, match=r"StudyConfig.num_train_evaluated=300 must be None or an integer in "
                                         r"\[1, num_train=256\]"):
        StudyConfig(num_train_evaluated=300)
    with pytest.raises(ValueError, match="StudyConfig.train_selections='no' must be True or False"):
        StudyConfig(train_selections="no")
    assert study_preset("default").train_selections and not study_preset("powered").train_selections
    with pytest.raises(ValueError, match="unknown preset"):
        study_preset("fast")
    quick, default = study_preset("quick"), study_preset("default")
    assert quick.configurations == ("layer",) and len(default.seeds) >= 3 and default.num_calibration == 32
    assert list(_config().variants) == ["ntk_n6", "ntk_n10", "sign_n6", "sign_n10"]


def test_krr_logits_match_a_dense_jacobian_reference(model, splits):
    """f0(E) + J_E J_Xᵀ(J_X J_Xᵀ + λI)⁻¹ r0 with J built explicitly over the LoRA parameters of S (7 calibration, 5 eval
    examples, O = 2), λ = ridge_trace·trace(J_X J_Xᵀ)/(N·O), against module kernels and cross kernels in blocks
    (blocks of 3 rows on both sides: one compiled tile for both)."""
    tok, ridge_trace = WordTokenizer(), 3e-3
    adapted = add_lora(model, rank=2, seed=1, head=True)
    modules = ("layer0.attention.query", "layer2.attention.value")
    x, e = (data.encode(d.subset(np.arange(n)), tok, max_length=16) for d, n in ((splits[0], 7), (splits[1], 5)))
    grams, cross = (module_ntks(adapted, b, x, trace_axes=(), modules=modules, block_size=3) for b in (x, e))
    f, lora = adapted.as_function(), adapted.trainable["lora"]
    both = {k: np.concatenate([x[k], e[k]]) for k in ("input_ids", "attention_mask")}  # one trace of J

    def f_s(sub):
        return f({**adapted.trainable, "lora": {**lora, **sub}}, both)

    jac = jax.jit(jax.jacobian(f_s))({m: lora[m] for m in modules})  # leaves (12, O, *parameter shape)
    j = np.concatenate([np.asarray(leaf).reshape(12 * 2, -1) for leaf in jax.tree.leaves(jac)], axis=1)
    j_x, j_e = j[:7 * 2], j[7 * 2:]  # rows example-major: example i, output c → i·O + c
    f0 = np.asarray(f(adapted.trainable, both))
    f0_x, f0_e = f0[:7], f0[7:]
    resid0 = np.eye(2)[x["labels"]] - f0_x
    k_xx = j_x @ j_x.T
    lam = ridge_trace * np.trace(k_xx) / k_xx.shape[0]
    want = f0_e + (j_e @ j_x.T @ np.linalg.solve(k_xx + lam * np.eye(len(k_xx)), resid0.reshape(-1))).reshape(5, 2)
    got, message = krr_logits(grams, cross, modules, f0_e, resid0, ridge_trace)
    assert message.startswith("ok") and got.shape == (5, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())
    assert not np.allclose(got, f0_e, atol=1e-6)  # the regressor moved off f0
    zero = {m: 0 * g for m, g in grams.items()}  # K_S = 0: λ = 0, no solve; NaN logits and outcomes
    nan_logits, message = krr_logits(zero, cross, modules, f0_e, resid0, ridge_trace)
    assert np.all(np.isnan(nan_logits)) and message.startswith("not_psd")
    assert all(np.isnan(v) for v in krr_outcomes(nan_logits, f0_e, e["labels"]).values())


def test_krr_outcomes_count_by_hand():
    labels = np.array([0, 1, 2, 1, 0, 2, 1])
    krr = np.eye(3)[[0, 1, 1, 1, 2, 2, 0]] + 0.1  # argmax 0 1 1 1 2 2 0: 4 of 7 right
    tuned = np.eye(3)[[0, 1, 2, 1, 2, 0, 0]] * 5 - 1  # agrees with krr on rows 0, 1, 3, 4, 6
    out = krr_outcomes(krr, tuned, labels)
    assert out["krr_eval_accuracy"] == pytest.approx(4 / 7) and out["krr_agreement"] == pytest.approx(5 / 7)
    # per class F1 = 2TP/(2TP + FP + FN): class 0 TP 1 FP 1 FN 1; class 1 TP 2 FP 1 FN 1; class 2 TP 1 FP 1 FN 1
    assert out["krr_eval_macro_f1"] == pytest.approx(np.mean([2 / 4, 4 / 6, 2 / 4]))
    assert out["krr_eval_macro_f1"] == pytest.approx(macro_f1(labels, krr.argmax(-1), 3))


def _check_statistics(model, train_data, result, config):
    """Every run's statistics = those of the summed module kernels, recomputed here from scratch."""
    tok = WordTokenizer()
    adapted = add_lora(model, rank=config.rank, alpha=config.alpha, seed=config.seeds[0], head=True)
    ones = gate_vector(adapted, adapted.lora_modules)
    for seed in config.seeds:
        trainable = add_lora(model, rank=config.rank, alpha=config.alpha, seed=seed, head=True).trainable
        for variant in config.variants.values():
            n = variant["num_calibration"]
            batch = data.encode(data.calibration_subset(train_data, n), tok, max_length=config.max_length)
            grams = module_ntks(adapted, batch, trace_axes=(), kernel=variant["kernel"], trainable=trainable,
                                modules=adapted.lora_modules)
            f0 = evaluate(adapted.as_function(gate=ones), trainable, [{**batch, "example_mask": np.ones(n)}])["logits"]
            resid0 = np.eye(2)[batch["labels"]] - f0
            for run in (r for r in result["runs"] if r["seed"] == seed):
                gram = configuration_kernel(grams, run["modules"])
                want = kernel_statistics(gram, resid0, kernel=variant["kernel"])
                got = {s: run["statistics"][variant["prefix"] + s] for s in want}
                for s, value in want.items():  # κ-like values of these near-singular kernels: eps·κ ≈ 1e-6
                    rtol = 1e-9 if s in ("mu_max", "trace", "effective_rank", "stable_rank") else 1e-4
                    np.testing.assert_allclose(got[s], value, rtol=rtol, err_msg=f"{run['configuration']} {s}")
                if variant["kernel"] == "ntk":
                    ref = spectrum_stats(gram)
                    np.testing.assert_allclose([got["kappa"], got["mu_min"], got["trace"], got["effective_rank"]],
                                               [ref["kappa_sigma"], ref["mu_min"], ref["trace"],
                                                ref["effective_rank"]], rtol=1e-6)


def _check_krr(model, splits, result, config):
    """Every run's KRR fields, recomputed from the seed's kernels on the largest calibration set and the eval rows."""
    tok, (train_data, eval_data) = WordTokenizer(), splits
    adapted = add_lora(model, rank=config.rank, alpha=config.alpha, seed=config.seeds[0], head=True)
    x = data.encode(data.calibration_subset(train_data, config.num_calibration_large), tok, max_length=16)
    e = data.encode(eval_data.subset(np.arange(config.num_eval)), tok, max_length=16)
    ones = gate_vector(adapted, adapted.lora_modules)
    f0_x, f0_e = (evaluate(adapted.as_function(gate=ones), adapted.trainable,
                           [{**b, "example_mask": np.ones(len(b["labels"]))}])["logits"] for b in (x, e))
    for seed in config.seeds:
        trainable = add_lora(model, rank=config.rank, alpha=config.alpha, seed=seed, head=True).trainable
        grams, cross = (module_ntks(adapted, b, x, trace_axes=(), trainable=trainable, modules=adapted.lora_modules)
                        for b in (x, e))
        for run in (r for r in result["runs"] if r["seed"] == seed):
            logits, _ = krr_logits(grams, cross, run["modules"], f0_e, np.eye(2)[x["labels"]] - f0_x,
                                   config.ridge_trace)
            assert run["krr_eval_accuracy"] == np.mean(logits.argmax(-1) == e["labels"]), run["configuration"]


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny BERT
def test_run_study_result(model, splits):
    config = _config()
    logged = []
    result = run_study(model, *splits, config, tokenizer=WordTokenizer(), progress=False, callback=logged.append)
    json.dumps(result, allow_nan=False)
    runs = result["runs"]
    assert len(runs) == 12 * 2 and len(logged) >= len(runs)  # 3 layers + 9 single modules, 2 seeds
    assert {r["configuration"] for r in runs} >= {"layer0", "layer2.attention.value"}
    names = set(runs[0]["statistics"])
    assert set(STATISTICS) <= names and {"ntk_n10.kappa", "sign_n6.kappa", "sign_n10.kappa_traced"} <= names
    for run in runs:
        assert len(run["train_loss_curve"]) == config.steps and 0 <= run["eval_accuracy"] <= 1
        assert run["prefix_start_layer"] == 0  # the study's frozen prefix is off by default
        assert all(0 <= run[k] <= 1 for k in ("eval_macro_f1", "krr_eval_accuracy", "krr_eval_macro_f1",
                                              "krr_agreement"))
    krr = result["results"]["krr_eval_accuracy"]["eval_accuracy"]
    assert krr["n"] == len(runs) and len(krr["pearson_ci"]) == len(krr["spearman_ci"]) == 2
    # over runs the bootstrap resamples whole configurations (their seeds share κ); over their means, pairs
    assert (krr["resampling"], krr["n_groups"]) == ("groups", 12)
    by_configuration = result["results_by_configuration"]["krr_eval_accuracy"]["eval_accuracy"]
    assert (by_configuration["resampling"], by_configuration["n"]) == ("pairs", 12)
    want = correlation([r["krr_eval_accuracy"] for r in runs], [r["eval_accuracy"] for r in runs],
                       groups=[r["configuration"] for r in runs], n_bootstrap=config.n_bootstrap)
    np.testing.assert_allclose([float(v) for v in krr["spearman_ci"]], want["spearman_ci"], rtol=1e-12)
    assert "krr_eval_accuracy" not in runs[0]["statistics"] and "krr_s" in result["timings"]
    for stat in [*names, *PREDICTORS]:
        for outcome in OUTCOMES:
            for table, n in ((result["results"], len(runs)), (result["results_by_configuration"], 12)):
                corr = table[stat][outcome]
                assert corr["n"] + corr["n_dropped"] == n and {"pearson", "spearman", "spearman_ci"} <= set(corr)
    assert result["selection"]["sigma_scale"] == "trace" and result["selection"]["sigma"] == config.sigma_trace
    methods = result["selection"]["methods"]
    assert set(methods) >= {f"greedy_{s}" for s in SCORES} | {"all", "top_layers", "random", "best_single"}
    assert all(len(m["modules"]) == 2 for k, m in methods.items() if k.startswith("greedy") or k == "random")
    assert len(methods["greedy_kappa"]["scores"]) == 2 and "eval_accuracy" in methods["all"]
    assert all({"krr_eval_accuracy", "krr_agreement", "eval_macro_f1"} <= set(m) for m in methods.values())
    assert result["timings"]["total_s"] > 0 and result["variants"]["primary"] == "ntk_n6"
    _check_statistics(model, splits[0], result, config)
    _check_krr(model, splits, result, config)


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny BERT
def test_run_study_is_deterministic_and_its_frozen_prefix_changes_nothing(model, splits):
    config = _config(configurations={"a": ("layer0.attention.query",), "b": ("layer1.attention.key",),
                                     "c": ("layer2.attention.value", "layer2.attention.key")},
                     seeds=(4, 5), kernels=("ntk",), num_calibration_large=None)
    config = dataclasses.replace(config, frozen_prefix=True)  # the second seed reuses the first's prefixes
    one, two, whole, scored = (run_study(model, *splits, c, tokenizer=WordTokenizer(), progress=False)
                               for c in (config, config, dataclasses.replace(config, frozen_prefix=False),
                                         dataclasses.replace(config, num_train_evaluated=5,
                                                             train_selections=False)))
    def outcomes(result):
        return {k: (m["modules"], m["scores"], m["final_train_loss"], m["eval_accuracy"])
                for k, m in result["selection"]["methods"].items()}

    assert outcomes(one) == outcomes(two)
    assert [r["final_train_loss"] for r in one["runs"]] == [r["final_train_loss"] for r in two["runs"]]
    assert [r["prefix_start_layer"] for r in one["runs"]] == [0, 1, 2] * 2
    assert [r["prefix_start_layer"] for r in whole["runs"]] == [0, 0, 0] * 2
    for got, want in zip(one["runs"], whole["runs"]):
        np.testing.assert_allclose(got["train_loss_curve"], want["train_loss_curve"], rtol=1e-10)
        assert got["eval_accuracy"] == want["eval_accuracy"]
        np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-10)
    # selections chosen but not trained: the same modules, scores and statistics, no outcomes, no extra runs
    chosen, kept = scored["selection"]["methods"], one["selection"]["methods"]
    assert {k: m["modules"] for k, m in chosen.items()} == {k: m["modules"] for k, m in kept.items()}
    assert all(set(m) == {"modules", "scores", "statistics"} and m["statistics"] == kept[k]["statistics"]
               for k, m in chosen.items())
    assert scored["timings"]["num_trained_runs"] == len(scored["runs"]) < one["timings"]["num_trained_runs"]
    assert "not trained" in scored["variants"]["selection_training"]
    assert one["variants"]["selection_training"].startswith("each selection trained with seed 4")
    # scoring only the first 5 training examples changes the train-set scores and nothing else
    assert "over the first 5 training examples" in scored["variants"]["final_train_loss"]
    assert "over the first 16 training examples" in one["variants"]["final_train_loss"]
    for got, want in zip(scored["runs"], one["runs"]):
        assert got["train_loss_curve"] == want["train_loss_curve"] and got["eval_loss"] == want["eval_loss"]
        assert got["final_train_loss"] != want["final_train_loss"]
        assert abs(got["train_accuracy"] * 5 - round(got["train_accuracy"] * 5)) < 1e-9  # a count of 5
    with pytest.raises(ValueError, match="not candidates"):
        run_study(model, *splits, _config(configurations={"x": ("pooler.dense",)}), tokenizer=WordTokenizer(),
                  progress=False)


MESH_STUDY = _config(configurations={"a": ("layer0.attention.query",),
                                     "b": ("layer2.attention.value", "layer2.attention.key")},
                     seeds=(4,), kernels=("ntk",), num_calibration_large=None, selection_budget=1, batch_size=8)


@pytest.fixture(scope="module")
def one_device_study(model, splits):
    return run_study(model, *splits, MESH_STUDY, tokenizer=WordTokenizer(), progress=False)


@pytest.mark.parametrize(*tiered("shape", [(4, 2), (2, 4), (8, 1)], fast=[(4, 2)]))
def test_run_study_on_a_mesh_equals_one_device(model, splits, one_device_study, shape):
    """The study with the model's parameters sharded by the rules on a (data, model) mesh: kernels, statistics,
    every run's curve and outcomes, the KRR predictor and the selections equal one device's."""
    from jax.sharding import Mesh

    from jaxlin import sharding

    config, want = MESH_STUDY, one_device_study
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
    placed = sharding.shard_model(model, mesh)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed.params)) == (shape[1] > 1)
    got = run_study(placed, *splits, config, tokenizer=WordTokenizer(), progress=False, mesh=mesh)
    assert [r["configuration"] for r in got["runs"]] == [r["configuration"] for r in want["runs"]]
    for g, w in zip(got["runs"], want["runs"]):
        np.testing.assert_allclose(g["train_loss_curve"], w["train_loss_curve"], rtol=1e-9)
        for key in ("eval_accuracy", "train_accuracy", "krr_eval_accuracy", "krr_agreement", "eval_macro_f1"):
            assert g[key] == w[key], key
        for key in ("final_train_loss", "eval_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-9), key
        for name, value in w["statistics"].items():
            assert g["statistics"][name] == pytest.approx(value, rel=1e-6), name
    for name, method in want["selection"]["methods"].items():
        assert got["selection"]["methods"][name]["modules"] == method["modules"], name
        assert got["selection"]["methods"][name]["eval_accuracy"] == method["eval_accuracy"], name


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny Llama
def test_run_study_through_the_label_word_readout():
    """The study on a causal LM read through label words: kernels, residuals and training all use the (N, 2)
    label-word logits; no head is added (train_head is ignored and recorded as such)."""
    import jaxlin
    from word_tokenizer import sentiment_data, word_tokenizer

    model = tiny_model("llama", task="causal_lm", dtype=jnp.float64)
    readout = jaxlin.label_word_readout(word_tokenizer(), ["bad", "good"], template="Review: {text} Sentiment:")
    train, ev = sentiment_data(24, seed=0), sentiment_data(8, seed=1)
    config = _config(configurations={"a": ("layer0.self_attn.q_proj",), "b": ("layer2.self_attn.v_proj",)},
                     targets=("q_proj", "v_proj"), seeds=(0,), kernels=("ntk",), num_calibration_large=None,
                     num_train=16, num_eval=8, selection_budget=1)
    result = run_study(model, train, ev, config, tokenizer=readout, output_fn=readout.output_fn, progress=False)
    assert result["variants"]["train_head"] is False and "train_head ignored" in result["variants"]["readout"]
    assert [r["configuration"] for r in result["runs"]] == ["a", "b"]
    assert all(np.isfinite(r["final_train_loss"]) and np.isfinite(r["statistics"]["kappa"]) for r in result["runs"])
    with pytest.raises(ValueError, match=r"task='causal_lm'\) for a label-word readout"):
        run_study(tiny_model("llama", task="classification", num_labels=2), train, ev, config, tokenizer=readout,
                  output_fn=readout.output_fn, progress=False)
    three = jaxlin.label_word_readout(word_tokenizer(), ["bad", "good", "fine"])
    with pytest.raises(ValueError, match="one label word per class"):
        run_study(model, train, ev, config, tokenizer=three, output_fn=three.output_fn, progress=False)


def test_results_example_and_report_carry_the_krr_correlation():
    """The results.json example validates with the KRR run keys, and the report's summary names the KRR test."""
    from jaxlin.report import summary_text
    from jaxlin.schema import SchemaError, example_results, validate_results

    example = example_results()
    runs = example["correlation"]["runs"]
    assert {"krr_eval_accuracy", "krr_agreement"} <= set(runs[0])
    assert "corr(KRR eval accuracy, eval_accuracy): Spearman ρ = " in summary_text(example)
    runs[0]["krr_agreement"] = "high"
    with pytest.raises(SchemaError, match=r"correlation\.runs\[0\]\.krr_agreement"):
        validate_results(example)


@pytest.mark.slow  # a whole small study; the gated step (above) and the next-token loss (test_next_token) are checked fast
def test_run_study_with_the_next_token_objective(monkeypatch):
    """`objective=NextTokenObjective(readout=r)`: every run trains the LM's next-token loss of its label word on
    the one gated step (the loss is traced by the first run only), the objective is recorded, the training loss
    falls below its value at θ0, and eval_accuracy / eval_macro_f1 are those of the trained parameters' label-word
    logits, recomputed here through the readout (train.evaluate), independent of the next-token evaluation."""
    import jaxlin
    from word_tokenizer import sentiment_data, word_tokenizer

    from jaxlin import next_token, study

    model = tiny_model("llama", task="causal_lm", dtype=jnp.float64)
    readout = jaxlin.label_word_readout(word_tokenizer(), ["bad", "good"], template="Review: {text} Sentiment:")
    train, ev = sentiment_data(24, seed=0), sentiment_data(12, seed=2)  # 4 of 12 eval examples positive
    config = _config(configurations={"a": ("layer0.self_attn.q_proj",), "b": ("layer0.self_attn.v_proj",)},
                     targets=("q_proj", "v_proj"), layers=(0,), seeds=(0,), kernels=("ntk",),
                     num_calibration_large=None, num_train=16, num_eval=12, selection_budget=1, steps=4,
                     warmup_ratio=0.0, learning_rate=0.1, n_bootstrap=20)
    traces, fitted, tuned, at_run = [], [], [], []
    loss_call, outcomes = next_token._NextTokenLoss.__call__, study.krr_outcomes
    monkeypatch.setattr(next_token._NextTokenLoss, "__call__",
                        lambda self, *a: (traces.append(1), loss_call(self, *a))[1])
    monkeypatch.setattr(study, "fit", lambda f, *a, **k: (fitted.append((np.asarray(f.gate_M), r := fit(f, *a, **k))),
                                                         r)[1])
    monkeypatch.setattr(study, "krr_outcomes", lambda krr, logits, labels: (tuned.append(logits),
                                                                             outcomes(krr, logits, labels))[1])
    objective = next_token.run_objective("next_token", readout)
    result = run_study(model, train, ev, config, tokenizer=readout, output_fn=readout.output_fn, objective=objective,
                       progress=False, callback=lambda record: at_run.append(len(traces)))
    assert result["variants"]["objective"] == "next_token" and "next-token" in result["variants"]["final_train_loss"]
    assert len(fitted) == len(tuned) == 3 and len(set(at_run)) == 1 and at_run[0] > 0  # no trace after the first run

    adapted = add_lora(model, targets=("q_proj", "v_proj"), layers=(0,), rank=config.rank, alpha=config.alpha, seed=0)
    f0, _ = next_token.next_token_functions(adapted)
    pairs = next_token.completions_from_labels(train.subset(np.arange(config.num_train)), readout)
    loss0 = next_token.evaluate_next_token(f0, adapted.trainable, next_token.completion_batches(
        pairs, readout.tokenizer, batch_size=8, max_length=config.max_length))["loss"]
    eval_batches = list(data.batches(ev.subset(np.arange(config.num_eval)), readout, batch_size=8, max_length=16))
    for record in [*result["runs"], *result["selection"]["methods"].values()]:
        gate = gate_vector(adapted, record["modules"])
        i = next(i for i, (g, _) in enumerate(fitted) if np.array_equal(g, gate))
        assert record["final_train_loss"] < loss0, record["configuration"]
        found = evaluate(adapted.as_function(readout.output_fn, gate=gate), fitted[i][1].trainable, eval_batches)
        np.testing.assert_allclose(tuned[i], found["logits"], rtol=1e-6, atol=1e-7)  # kept as float32
        assert record["eval_accuracy"] == found["accuracy"], record["configuration"]
        assert record["eval_macro_f1"] == macro_f1(found["labels"], found["logits"].argmax(-1), 2)
    with pytest.raises(ValueError, match="tokenizer=readout, output_fn=readout.output_fn"):
        run_study(model, train, ev, config, tokenizer=readout, output_fn=readout.output_fn,
                  objective=next_token.NextTokenObjective(), progress=False)
