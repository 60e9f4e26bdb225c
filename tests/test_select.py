"""jaxlin.select: configurations, §6.2 perturbation facts, Theorem 7 counterexample, greedy selection."""
import math

import numpy as np
import pytest

from jaxlin.select import (SCORES, baseline_selections, configuration_kernel, configuration_stats,
                           enumerate_configurations, greedy_select, parse_module_name, perturbation_report,
                           spectral_selection, theorem7_counterexample)
from jaxlin.spectrum import DEFAULT_RIDGE_TRACE, DEFAULT_SIGMA_SCALE, DEFAULT_SIGMA_TRACE, spectrum_stats

NAMES = tuple(f"layer{i}.attention.{p}" for i in range(3) for p in ("query", "key", "value"))


def random_psd(rng, n, rank):
    a = rng.normal(size=(n, rank))
    return a @ a.T


def module_grams(seed=0, n=13, rank=5):
    rng = np.random.default_rng(seed)
    return {name: random_psd(rng, n, rank) for name in NAMES}


def test_parse_module_name():
    assert parse_module_name("layer3.attention.query") == (3, "query")
    assert parse_module_name("roberta.encoder.layer.11.attention.self.value") == (11, "value")
    assert parse_module_name("model.layers.2.self_attn.q_proj") == (2, "q_proj")
    assert parse_module_name("head.dense") == (None, "dense")


def test_configuration_kernel_is_sum():
    grams = module_grams()
    got = configuration_kernel(grams, ["layer0.attention.query", "layer2.attention.value"])
    np.testing.assert_array_equal(got, grams["layer0.attention.query"] + grams["layer2.attention.value"])
    full = {k: np.random.default_rng(1).normal(size=(3, 3, 2, 2)) for k in ("a", "b")}
    np.testing.assert_allclose(configuration_kernel(full, ("a", "b")), full["a"] + full["b"])
    with pytest.raises(ValueError, match=r"unknown modules \['layer9.attention.query'\].*layer0.attention.key"):
        configuration_kernel(grams, ["layer9.attention.query"])
    with pytest.raises(ValueError, match="repeat"):
        configuration_kernel(grams, ["layer0.attention.query"] * 2)


def test_enumerate_configurations():
    single = enumerate_configurations(NAMES, "single")
    assert list(single) == list(NAMES) and single[NAMES[4]] == (NAMES[4],)
    layer = enumerate_configurations(NAMES, "layer")
    assert list(layer) == ["layer0", "layer1", "layer2"]
    assert layer["layer1"] == ("layer1.attention.query", "layer1.attention.key", "layer1.attention.value")
    proj = enumerate_configurations(NAMES, "projection")
    assert list(proj) == ["query", "key", "value"]
    assert proj["key"] == ("layer0.attention.key", "layer1.attention.key", "layer2.attention.key")
    top = enumerate_configurations(NAMES, "top_k")
    assert list(top) == ["top1", "top2", "top3"]
    assert top["top1"] == NAMES[6:] and top["top2"] == NAMES[3:] and top["top3"] == NAMES
    assert enumerate_configurations(NAMES, "all") == {"all": NAMES}
    with pytest.raises(ValueError, match="family='layers'"):
        enumerate_configurations(NAMES, "layers")
    with pytest.raises(ValueError, match="head.dense"):
        enumerate_configurations(NAMES + ("head.dense",), "layer")
    # numeric, not lexicographic, layer order
    assert list(enumerate_configurations(["layer10.q", "layer2.q"], "layer")) == ["layer2", "layer10"]


def test_configuration_stats_matches_direct():
    grams = module_grams()
    configs = enumerate_configurations(NAMES, "layer")
    stats = configuration_stats(grams, configs, 1e-2, sigma_scale="trace")
    for name, mods in configs.items():
        direct = spectrum_stats(sum(grams[m] for m in mods), 1e-2, sigma_scale="trace")
        np.testing.assert_allclose(stats[name]["eigenvalues"], direct["eigenvalues"], rtol=1e-12, atol=1e-12)
        assert stats[name]["kappa_sigma"] == pytest.approx(direct["kappa_sigma"], rel=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1e-2])
def test_weyl_and_mediant_hold(sigma):
    rng = np.random.default_rng(7)
    for trial in range(200):
        n = int(rng.integers(2, 9))
        gram_s = random_psd(rng, n, n + 2)
        gram_l = random_psd(rng, n, int(rng.integers(1, n + 1))) * rng.uniform(0.1, 10)
        rep = perturbation_report(gram_s, gram_l, ridge=0.5, resid0=rng.normal(size=n), sigma=sigma)
        assert rep["weyl_holds"], (trial, rep["weyl_max_violation"])
        assert rep["mediant_holds"], (trial, rep["kappa_sum"], rep["mediant_bound"], rep["mediant_max_bound"])
        assert rep["ridge_objective_nonincreasing"]
        assert np.all(rep["eigenvalues_sum"] >= rep["eigenvalues_S"] - 1e-9 * rep["eigenvalues_S"][0])


def test_mediant_with_sigma_counts_sigma_once():
    """max(κ_σ(K_S), κ_σ(K_l)) is not a bound; max(κ_σ(K_S), κ(K_l)) is (docs/paper.md §6.2 wording)."""
    rep = perturbation_report(np.diag([1.0, 0.0]), np.diag([1.0, 0.0]), sigma=1.0)
    assert rep["kappa_S"] == 2.0 and rep["kappa_l_sigma"] == 2.0 and rep["kappa_sum"] == 3.0
    assert math.isinf(rep["mediant_max_bound"]) and rep["mediant_holds"] and rep["kappa_rose"]


def test_three_by_three_trials_monotone_objective_not_residual():
    rng = np.random.default_rng(11)
    trials, kappa_rose, resid_rose = 2000, 0, 0
    for _ in range(trials):
        gram_s = random_psd(rng, 3, 3)
        v = rng.normal(size=(3, 1))
        rep = perturbation_report(gram_s, v @ v.T, ridge=1.0, resid0=rng.normal(size=3))
        assert rep["ridge_objective_after"] <= rep["ridge_objective_before"] * (1 + 1e-12)
        assert rep["weyl_holds"] and rep["mediant_holds"]
        kappa_rose += rep["kappa_rose"]
        resid_rose += rep["residual_norm_increased"]
    # both are real (docs/paper.md §6.2 reports ~28% and ~8%); only their existence is asserted
    assert 0 < kappa_rose < trials and 0 < resid_rose < trials


def test_perturbation_report_errors():
    with pytest.raises(ValueError, match="ridge and resid0 go together"):
        perturbation_report(np.eye(3), np.eye(3), ridge=1.0)
    with pytest.raises(ValueError, match="resid0 has 2 entries"):
        perturbation_report(np.eye(3), np.eye(3), ridge=1.0, resid0=np.ones(2))
    with pytest.raises(ValueError, match="ridge=0.0"):
        perturbation_report(np.eye(3), np.eye(3), ridge=0.0, resid0=np.ones(3))
    with pytest.raises(ValueError, match="same examples"):
        perturbation_report(np.eye(3), np.eye(4))


def test_theorem7_counterexample():
    ce = theorem7_counterexample()
    assert ce["residual_before"] == 0.5 and ce["residual_after"] == 0.2
    assert ce["ratio"] == 0.4 and ce["ratio_exact"] == "2/5"
    assert ce["eq21_bound_reported"] == 10.0 and "unverified" in ce["eq21_bound_status"]
    rep = perturbation_report([[ce["K"]]], [[ce["S"]]], ridge=ce["sigma"], resid0=[ce["Y"]])
    assert rep["residual_norm_after"] / rep["residual_norm_before"] == pytest.approx(0.4, rel=1e-15)


def test_greedy_known_answer_and_ties():
    n = 11
    ill = np.diag(np.geomspace(1e-3, 1.0, n))
    grams = {name: ill.copy() for name in NAMES}
    grams["layer1.attention.key"] = np.eye(n)  # κ = 1: the unique best first pick
    out = greedy_select(grams, 1)
    assert out["selected"] == ["layer1.attention.key"] and out["scores"] == [pytest.approx(1.0)]
    # identical candidates: module order breaks the tie, every run
    same = {name: np.eye(n) for name in NAMES}
    assert greedy_select(same, 3)["selected"] == list(NAMES[:3])
    best_mu = dict(grams, **{"layer2.attention.query": 3.0 * np.eye(n)})
    mu = greedy_select(best_mu, 2, score="mu_min", sigma=1e-4)
    assert mu["selected"][0] == "layer2.attention.query"
    assert mu["scores"][0] == pytest.approx(3.0 + 1e-4)


def test_greedy_matches_brute_force_steps():
    grams = module_grams(seed=3, rank=3)
    out = greedy_select(grams, 4, sigma=1e-2, sigma_scale="trace")
    assert out == greedy_select(grams, 4, sigma=1e-2, sigma_scale="trace")
    chosen = []
    for step_name, step_score in zip(out["selected"], out["scores"]):
        scores = {m: spectrum_stats(sum(grams[c] for c in chosen + [m]), 1e-2, sigma_scale="trace")["kappa_sigma"]
                  for m in NAMES if m not in chosen}
        best = min(scores.values())
        assert step_name == next(m for m in scores if scores[m] == best) and step_score == best
        chosen.append(step_name)


def test_greedy_ridge_objective():
    grams = module_grams(seed=4)
    with pytest.raises(ValueError, match="ridge and resid0"):
        greedy_select(grams, 2, score="ridge_objective")
    with pytest.raises(ValueError, match="score='cond'"):
        greedy_select(grams, 2, score="cond")
    out = greedy_select(grams, 9, score="ridge_objective", ridge=0.1, resid0=np.ones(13))
    assert sorted(out["selected"]) == sorted(NAMES)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(out["scores"], out["scores"][1:]))  # never increases


def test_greedy_parameter_budget():
    grams = module_grams(seed=5)
    counts = {name: (100 if "query" in name else 30) for name in NAMES}
    out = greedy_select(grams, 160, param_counts=counts, budget_unit="parameters")
    assert out["cost"] <= 160 and out["cost"] == sum(counts[m] for m in out["selected"])
    assert all(out["cost"] + counts[m] > 160 for m in NAMES if m not in out["selected"])
    with pytest.raises(ValueError, match="missing"):
        greedy_select(grams, 160, param_counts={"layer0.attention.query": 1}, budget_unit="parameters")
    with pytest.raises(ValueError, match="budget=10"):
        greedy_select(grams, 10)


def test_baseline_selections():
    grams = module_grams(seed=6)
    grams["layer0.attention.value"] = np.eye(13)
    out = baseline_selections(NAMES, 4, seed=3, module_grams=grams)
    assert out["all"] == NAMES
    assert out["top_layers"] == ("layer1.attention.query",) + NAMES[6:]
    expected = np.sort(np.random.default_rng(3).choice(9, size=4, replace=False))
    assert out["random"] == tuple(NAMES[i] for i in expected)
    assert out["random"] == baseline_selections(NAMES, 4, seed=3)["random"]
    assert out["best_single"] == ("layer0.attention.value",)
    kappas = {m: spectrum_stats(grams[m])["kappa_sigma"] for m in NAMES}
    assert out["best_singles"] == tuple(sorted(NAMES, key=kappas.get)[:4])
    assert "best_single" not in baseline_selections(NAMES, 2, seed=0)


def test_spectral_selection_is_greedy_plus_baselines_with_one_sigma_convention():
    grams = module_grams(seed=7)
    grams["layer2.attention.key"] = 50.0 * grams["layer2.attention.key"]  # scale differs across modules
    resid0 = np.linspace(-1.0, 1.0, 13)
    out = spectral_selection(grams, 3, resid0, seed=1)
    assert (out["sigma"], out["sigma_scale"]) == (DEFAULT_SIGMA_TRACE, DEFAULT_SIGMA_SCALE) == (1e-4, "trace")
    assert out["ridge"] == pytest.approx(DEFAULT_RIDGE_TRACE * np.trace(sum(grams.values())) / 13, rel=1e-12)
    assert list(out["methods"])[:len(SCORES)] == [f"greedy_{s}" for s in SCORES]
    for score in SCORES:
        want = greedy_select(grams, 3, score=score, sigma=1e-4, sigma_scale="trace", ridge=out["ridge"],
                             resid0=resid0)
        assert out["methods"][f"greedy_{score}"] == {"modules": want["selected"], "scores": want["scores"]}
    baselines = baseline_selections(NAMES, 3, seed=1, module_grams=grams, sigma=1e-4, sigma_scale="trace")
    assert {k: tuple(v["modules"]) for k, v in out["methods"].items() if not k.startswith("greedy")} == baselines
    absolute = spectral_selection(grams, 3, resid0, seed=1, sigma=1e-4, sigma_scale="absolute")
    want = greedy_select(grams, 3, sigma=1e-4, sigma_scale="absolute")
    assert absolute["sigma_scale"] == "absolute" and absolute["methods"]["greedy_kappa"]["modules"] == want["selected"]
