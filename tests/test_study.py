"""jaxlin.study: gated LoRA training (exactness, equivalence to a restricted adapter, one trace), configuration
statistics against summed module kernels, the JSON result and its correlations, selections. Tiny BERT, a
synthetic two-class data set and a fake whitespace tokenizer; every text has 6 words, so one padded length.
The model is float64: its tiny LoRA kernels are near-singular (κ ~ 1e5), so float32 tiles would blur μ_min."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlin import data
from jaxlin.adapters import add_lora
from jaxlin.module_ntk import module_ntks
from jaxlin.select import SCORES, configuration_kernel
from jaxlin.spectrum import STATISTICS, kernel_statistics, spectrum_stats
from jaxlin.study import OUTCOMES, StudyConfig, gate_vector, run_study, study_preset
from jaxlin.testing import tiny_model
from jaxlin.train import TrainConfig, evaluate, fit, make_optimizer, model_functions

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
    with pytest.raises(ValueError, match="unknown preset"):
        study_preset("fast")
    quick, default = study_preset("quick"), study_preset("default")
    assert quick.configurations == ("layer",) and len(default.seeds) >= 3 and default.num_calibration == 32
    assert list(_config().variants) == ["ntk_n6", "ntk_n10", "sign_n6", "sign_n10"]


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
    for stat in names:
        for outcome in OUTCOMES:
            for table, n in ((result["results"], len(runs)), (result["results_by_configuration"], 12)):
                corr = table[stat][outcome]
                assert corr["n"] + corr["n_dropped"] == n and {"pearson", "spearman", "spearman_ci"} <= set(corr)
    assert result["selection"]["sigma_scale"] == "trace" and result["selection"]["sigma"] == config.sigma_trace
    methods = result["selection"]["methods"]
    assert set(methods) >= {f"greedy_{s}" for s in SCORES} | {"all", "top_layers", "random", "best_single"}
    assert all(len(m["modules"]) == 2 for k, m in methods.items() if k.startswith("greedy") or k == "random")
    assert len(methods["greedy_kappa"]["scores"]) == 2 and "eval_accuracy" in methods["all"]
    assert result["timings"]["total_s"] > 0 and result["variants"]["primary"] == "ntk_n6"
    _check_statistics(model, splits[0], result, config)


@pytest.mark.slow  # end to end: trains gated LoRA runs of a tiny BERT
def test_run_study_is_deterministic(model, splits):
    config = _config(configurations={"a": ("layer0.attention.query",), "b": ("layer1.attention.key",),
                                     "c": ("layer2.attention.value", "layer0.attention.key")},
                     seeds=(4,), kernels=("ntk",), num_calibration_large=None)
    one, two = (run_study(model, *splits, config, tokenizer=WordTokenizer(), progress=False) for _ in range(2))
    def outcomes(result):
        return {k: (m["modules"], m["scores"], m["final_train_loss"], m["eval_accuracy"])
                for k, m in result["selection"]["methods"].items()}

    assert outcomes(one) == outcomes(two)
    assert [r["final_train_loss"] for r in one["runs"]] == [r["final_train_loss"] for r in two["runs"]]
    with pytest.raises(ValueError, match="not candidates"):
        run_study(model, *splits, _config(configurations={"x": ("pooler.dense",)}), tokenizer=WordTokenizer(),
                  progress=False)


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
