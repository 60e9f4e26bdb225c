"""Layer configurations, spectral perturbation facts and greedy spectral layer selection (docs/paper.md §6).

A module kernel dict `module_grams` maps module name (e.g. "layer3.attention.query") → K_m, (n, n) or
(N, N, O, O) (read as in `spectrum.as_matrix`); dict order is the module order and breaks every tie.
Kernels add over modules, K_S = Σ_{m∈S} K_m (§6.1), so every configuration below costs one small sum and
one small eigenproblem; nothing is recomputed from the model.

`spectral_selection` is the one selection routine (results.json's `selection`, the study's selections): greedy
selections for every score and the baselines, with one σ convention (spectrum module docstring).
"""
import math
import re
from fractions import Fraction

import numpy as np

from jaxlin.spectrum import (DEFAULT_RIDGE_TRACE, DEFAULT_SIGMA_SCALE, DEFAULT_SIGMA_TRACE, absolute_sigma,
                             as_matrix, kappa, ridge_terms, spectrum_stats)

FAMILIES = ("single", "layer", "projection", "top_k", "all")
SCORES = ("kappa", "mu_min", "ridge_objective")
BUDGET_UNITS = ("modules", "parameters")
_LAYER_RE = re.compile(r"(?:^|\.)layers?[._]?(\d+)(?:\.|$)")


def parse_module_name(name):
    """(layer index, projection) of a module name: "layer3.attention.query" → (3, "query").

    The layer is the integer after "layer" ("layer3", "layer.3", "layers.3", "layer_3"; None if absent);
    the projection is the last dotted component.
    """
    match = _LAYER_RE.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def _matrices(module_grams):
    """Module kernels as float64 (n, n) matrices, all of one size, in module order."""
    if not module_grams:
        raise ValueError("module_grams is empty; pass a dict module name → kernel")
    mats = {name: as_matrix(gram) for name, gram in module_grams.items()}
    sizes = {name: m.shape[0] for name, m in mats.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"module kernels differ in size {sizes}; compute them on the same examples")
    return mats


def _check_modules(modules, valid):
    modules = tuple(modules)
    if not modules:
        raise ValueError("empty module set; name at least one module")
    unknown = [m for m in modules if m not in valid]
    if unknown:
        raise ValueError(f"unknown modules {unknown}; valid modules are {list(valid)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"modules {list(modules)} repeat a name; each module kernel may be added once")
    return modules


def configuration_kernel(module_grams, modules):
    """K_S = Σ_{m∈S} K_m in float64, same shape as the module kernels (§6.1)."""
    modules = _check_modules(modules, module_grams)
    return sum(np.asarray(module_grams[m], dtype=np.float64) for m in modules)


def enumerate_configurations(module_names, family):
    """Configurations of one family → dict config name → tuple of modules (module order inside each).

    "single": {name: (name,)} per module; "layer": {"layer{i}": modules of layer i}, layers ascending;
    "projection": {proj: that projection across layers}, first-appearance order; "top_k": {"top{k}":
    modules of the last k layers}, k = 1..num_layers; "all": {"all": every module}.
    """
    names = tuple(module_names)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; use one of {FAMILIES}")
    if family == "single":
        return {n: (n,) for n in names}
    if family == "all":
        return {"all": names}
    parsed = {n: parse_module_name(n) for n in names}
    if family == "projection":
        projections = list(dict.fromkeys(p for _, p in parsed.values()))
        return {p: tuple(n for n in names if parsed[n][1] == p) for p in projections}
    missing = [n for n, (layer, _) in parsed.items() if layer is None]
    if missing:
        raise ValueError(f"family={family!r} needs a layer index in every name (e.g. 'layer3.attention.query'); "
                         f"none found in {missing}")
    layers = sorted({layer for layer, _ in parsed.values()})
    if family == "layer":
        return {f"layer{i}": tuple(n for n in names if parsed[n][0] == i) for i in layers}
    return {f"top{k}": tuple(n for n in names if parsed[n][0] in layers[-k:]) for k in range(1, len(layers) + 1)}


def configuration_stats(module_grams, configurations, sigma=0.0, *, sigma_scale="absolute"):
    """`spectrum_stats(K_S, sigma, sigma_scale=...)` for every configuration name → modules."""
    mats = _matrices(module_grams)
    return {name: spectrum_stats(sum(mats[m] for m in _check_modules(mods, mats)), sigma, sigma_scale=sigma_scale)
            for name, mods in configurations.items()}


def _check_ridge(ridge, resid0, required):
    if ridge is None and resid0 is None and not required:
        return None, None
    if ridge is None or resid0 is None:
        raise ValueError(f"ridge and resid0 go together (got ridge={ridge}, resid0 "
                         f"{'missing' if resid0 is None else 'given'}); pass both, e.g. ridge=1e-2 and "
                         "resid0 = Y − f0(X) flattened example-major")
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(f"ridge={ridge} must be finite and > 0")
    return ridge, resid0  # its length is checked against the kernel by `ridge_terms`


def _le(x, y, rtol):
    """x ≤ y up to relative tolerance (inf ≤ inf holds)."""
    return bool(x <= y or x == y or x <= y * (1.0 + rtol))


def perturbation_report(gram_S, gram_l, ridge=None, resid0=None, *, sigma=0.0, rtol=1e-9):
    """What adding a PSD K_l to K_S does (docs/paper.md §6.2), checked on the numbers.

    Weyl, per eigenvalue (descending): μ_i(K_S) + μ_min(K_l) ≤ μ_i(K_S+K_l) ≤ μ_i(K_S) + μ_max(K_l), checked
    to rtol·(|μ_max(K_S)| + |μ_max(K_l)|). Mediant, with one absolute σ:
      κ_σ(K_S+K_l) ≤ m = (μ_max(K_S)+μ_max(K_l)+σ)/(μ_min(K_S)+μ_min(K_l)+σ) ≤ max(κ_σ(K_S), κ(K_l)).
    σ is counted once, so the right-hand max pairs κ_σ(K_S) with the unregularised κ(K_l); the form
    max(κ_σ(K_S), κ_σ(K_l)) is false for σ > 0 (K_S = K_l = diag(1, 0), σ = 1: κ_σ = 2, 2 and 3 for the sum).
    κ comparisons use relative tolerance rtol·(1 + bound), the round-off growth of a ratio. `kappa_rose` says
    whether κ_σ(K_S+K_l) > κ_σ(K_S), which happens. With ridge λ and resid0 r0: the ridge objective
    ½λ r0ᵀ(K+λI)⁻¹r0 before/after (never increases: the inverse is operator-monotone) and the residual norm
    ‖λ(K+λI)⁻¹r0‖ before/after (can increase).
    """
    mat_s, mat_l = as_matrix(gram_S), as_matrix(gram_l)
    if mat_s.shape != mat_l.shape:
        raise ValueError(f"gram_S is {mat_s.shape} but gram_l is {mat_l.shape}; use kernels on the same examples")
    sigma = absolute_sigma(sigma, "absolute", 0.0, 1)
    stats_s, stats_l, stats_sum = (spectrum_stats(m, sigma) for m in (mat_s, mat_l, mat_s + mat_l))
    mu_s, mu_l, mu_sum = stats_s["eigenvalues"], stats_l["eigenvalues"], stats_sum["eigenvalues"]
    tol = rtol * (abs(mu_s[0]) + abs(mu_l[0]))
    lower, upper = mu_s + mu_l[-1], mu_s + mu_l[0]
    k_s, k_sum = stats_s["kappa_sigma"], stats_sum["kappa_sigma"]
    k_l = kappa(mu_l[0], mu_l[-1], 0.0)
    mediant = kappa(mu_s[0] + mu_l[0], mu_s[-1] + mu_l[-1], sigma)
    max_bound = max(k_s, k_l)
    report = {
        "eigenvalues_S": mu_s, "eigenvalues_l": mu_l, "eigenvalues_sum": mu_sum,
        "weyl_lower": lower, "weyl_upper": upper,
        "weyl_holds": bool(np.all(mu_sum >= lower - tol) and np.all(mu_sum <= upper + tol)),
        "weyl_max_violation": float(max(np.max(lower - mu_sum), np.max(mu_sum - upper), 0.0)),
        "sigma": sigma, "kappa_S": k_s, "kappa_l": k_l, "kappa_l_sigma": stats_l["kappa_sigma"],
        "kappa_sum": k_sum, "mediant_bound": mediant, "mediant_max_bound": max_bound,
        "mediant_holds": _le(k_sum, mediant, rtol * (1 + mediant)) and _le(mediant, max_bound, rtol * (1 + max_bound)),
        "kappa_rose": bool(k_sum > k_s),
    }
    ridge, resid0 = _check_ridge(ridge, resid0, required=False)
    if ridge is not None:
        obj_before, res_before = ridge_terms(mat_s, resid0, ridge)
        obj_after, res_after = ridge_terms(mat_s + mat_l, resid0, ridge)
        report.update({
            "ridge": ridge, "ridge_objective_before": obj_before, "ridge_objective_after": obj_after,
            "ridge_objective_nonincreasing": bool(obj_after <= obj_before * (1 + rtol)),
            "residual_norm_before": res_before, "residual_norm_after": res_after,
            "residual_norm_increased": bool(res_after > res_before),
        })
    return report


def theorem7_counterexample():
    """The third-party counterexample to Theorem 7 / Eq. 21 (docs/paper.md §4.4), in exact arithmetic.

    1×1 kernels K = 1, added S = 3, ridge σ = 1, target Y = 1 (with the critique's c = 1, η = 3, a = 0.25).
    Ridge residual σ/(K+σ)·Y = 1/2 before, σ/(K+S+σ)·Y = 1/5 after: ratio 2/5 = 0.4. Eq. 21's form is not
    known, so its value is not computed; the critique's statement that it gives 10 is recorded as unverified.
    """
    k, s, sigma, y = Fraction(1), Fraction(3), Fraction(1), Fraction(1)
    before, after = sigma / (k + sigma) * y, sigma / (k + s + sigma) * y
    ratio = after / before
    return {
        "K": float(k), "S": float(s), "sigma": float(sigma), "Y": float(y), "c": 1.0, "eta": 3.0, "a": 0.25,
        "residual_before": float(before), "residual_after": float(after),
        "ratio": float(ratio), "ratio_exact": f"{ratio.numerator}/{ratio.denominator}",
        "eq21_bound_reported": 10.0,
        "eq21_bound_status": "unverified third-party statement; Eq. 21's form is unknown and not computed here",
    }


def _budget_check(budget, budget_unit, names, param_counts):
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit={budget_unit!r}; use one of {BUDGET_UNITS}")
    if budget_unit == "modules":
        if not isinstance(budget, (int, np.integer)) or not 1 <= budget <= len(names):
            raise ValueError(f"budget={budget!r} must be an integer number of modules in [1, {len(names)}]")
        return {n: 1 for n in names}
    if param_counts is None or set(names) - set(param_counts):
        missing = list(names) if param_counts is None else [n for n in names if n not in param_counts]
        raise ValueError(f"budget_unit='parameters' needs param_counts for every module; missing {missing}")
    if not isinstance(budget, (int, float, np.integer, np.floating)) or not 0 <= budget < math.inf:
        raise ValueError(f"budget={budget!r} must be a finite parameter count ≥ 0")
    return {n: param_counts[n] for n in names}


def greedy_select(module_grams, budget, *, score="kappa", sigma=0.0, sigma_scale="absolute", ridge=None,
                  resid0=None, param_counts=None, budget_unit="modules"):
    """Greedy spectral layer selection (docs/paper.md §6.3 reconstruction).

    S = ∅; while the budget allows, add the affordable module l ∉ S optimising the score of K = K_S + K_l:
      "kappa": min κ_σ(K) = (μ_max+σ)/(μ_min+σ);  "mu_min": max μ_min(K) + σ;
      "ridge_objective": min ½λ r0ᵀ(K+λI)⁻¹r0 (needs ridge λ and resid0 r0).
    σ is absolute, or σ·trace(K)/n of each candidate K for sigma_scale="trace". Budget: a number of modules,
    or with budget_unit="parameters" a parameter count charged with param_counts[name]. No early stop:
    a step is taken even if the score worsens. Ties go to the earlier module in dict order. Returns
    {"selected": modules in order of addition, "scores": score after each addition, "candidate_scores":
    per step, name → score, "cost": budget used, ...settings}.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r}; use one of {SCORES}")
    mats = _matrices(module_grams)
    names = tuple(mats)
    n = mats[names[0]].shape[0]
    costs = _budget_check(budget, budget_unit, names, param_counts)
    ridge, resid0 = _check_ridge(ridge, resid0, required=score == "ridge_objective")

    def evaluate(mat):  # lower is better
        if score == "ridge_objective":
            return ridge_terms(mat, resid0, ridge)[0]
        stats = spectrum_stats(mat, sigma, sigma_scale=sigma_scale)
        return stats["kappa_sigma"] if score == "kappa" else -(stats["mu_min"] + stats["sigma"])

    sign = -1.0 if score == "mu_min" else 1.0  # report μ_min + σ itself, not its negation
    selected, scores, steps, spent, current = [], [], [], 0, np.zeros((n, n))
    while True:
        candidates = [m for m in names if m not in selected and spent + costs[m] <= budget]
        if not candidates:
            break
        step = {m: evaluate(current + mats[m]) for m in candidates}
        best = min(candidates, key=lambda m: step[m])  # min returns the first of equal values
        selected.append(best)
        current = current + mats[best]
        spent += costs[best]
        scores.append(sign * step[best])
        steps.append({m: sign * v for m, v in step.items()})
    return {"selected": selected, "scores": scores, "candidate_scores": steps, "cost": spent,
            "score": score, "sigma": sigma, "sigma_scale": sigma_scale, "budget": budget,
            "budget_unit": budget_unit}


def baseline_selections(module_names, budget, *, seed, module_grams=None, sigma=0.0, sigma_scale="absolute"):
    """Baseline module sets of `budget` modules (docs/paper.md §6.3): name → tuple of modules.

    "all": every module; "top_layers": the first `budget` modules when taking layers from the last down
    (module order within a layer); "random": `budget` modules drawn without replacement by
    numpy.random.default_rng(seed); these three are listed in module order. With module_grams also
    "best_single": the module of least κ_σ(K_l), and "best_singles": the `budget` modules of least
    κ_σ(K_l) (ascending κ, ties by module order).
    """
    names = tuple(module_names)
    _budget_check(budget, "modules", names, None)
    rank = {n: i for i, n in enumerate(names)}
    layers = {n: parse_module_name(n)[0] for n in names}
    missing = [n for n, layer in layers.items() if layer is None]
    if missing:
        raise ValueError(f"top_layers needs a layer index in every name (e.g. 'layer3.attention.query'); "
                         f"none found in {missing}")
    top = sorted(names, key=lambda n: (-layers[n], rank[n]))[:budget]
    chosen = np.random.default_rng(seed).choice(len(names), size=budget, replace=False)
    out = {"all": names, "top_layers": tuple(sorted(top, key=rank.get)),
           "random": tuple(names[i] for i in sorted(chosen))}
    if module_grams is not None:
        if set(module_grams) != set(names):
            raise ValueError(f"module_grams names {list(module_grams)} differ from module_names {list(names)}")
        singles = configuration_stats(module_grams, {n: (n,) for n in names}, sigma, sigma_scale=sigma_scale)
        by_kappa = sorted(names, key=lambda n: (singles[n]["kappa_sigma"], rank[n]))
        out["best_single"] = (by_kappa[0],)
        out["best_singles"] = tuple(by_kappa[:budget])
    return out


def spectral_selection(module_grams, budget, resid0, *, seed, sigma=DEFAULT_SIGMA_TRACE,
                       sigma_scale=DEFAULT_SIGMA_SCALE, ridge_trace=DEFAULT_RIDGE_TRACE):
    """Greedy selections (one per score of `SCORES`) and `baseline_selections` of `budget` modules.

    σ of κ_σ and μ_min + σ: `sigma` read in `sigma_scale` ("trace": σ·trace(K)/n of each candidate K, the
    scale-fair default; "absolute": σ itself, the paper's convention with sigma=1e-4). The ridge objective's
    λ = ridge_trace·trace(K_all)/n, fixed over candidates (K_all = Σ of every module kernel), and resid0 is
    r0 = onehot(y) − f0 on the kernels' examples, flattened example-major. Returns {"budget", "seed",
    "sigma", "sigma_scale", "ridge", "methods": {name: {"modules": [...], "scores": [score after each greedy
    step; [] for baselines]}}}; greedy methods are "greedy_<score>", baselines keep their names.
    """
    mats = _matrices(module_grams)
    n = next(iter(mats.values())).shape[0]
    ridge = ridge_trace * float(np.trace(sum(mats.values()))) / n
    methods = {}
    for score in SCORES:
        greedy = greedy_select(mats, budget, score=score, sigma=sigma, sigma_scale=sigma_scale, ridge=ridge,
                               resid0=resid0)
        methods[f"greedy_{score}"] = {"modules": list(greedy["selected"]), "scores": list(greedy["scores"])}
    for name, modules in baseline_selections(tuple(mats), budget, seed=seed, module_grams=mats, sigma=sigma,
                                             sigma_scale=sigma_scale).items():
        methods[name] = {"modules": list(modules), "scores": []}
    return {"budget": budget, "seed": seed, "sigma": float(sigma), "sigma_scale": sigma_scale, "ridge": ridge,
            "methods": methods}
