"""Verdicts on the paper's claims, read from a results dict (docs/results-schema.md); the rule lives here only.

`interval_verdict` is the one rule (docs/results-schema.md, "The report"; docs/study-design.md, "Hypotheses"): an
estimate with its 95 % interval is "supported" when the interval excludes 0 on the side the claim predicts, "not
supported" when it excludes 0 on the other side or lies inside the no-effect band ±`null_band`, and "inconclusive"
otherwise; it is always "inconclusive" with too few independent units (`MIN_UNITS`) or when more than
`MAX_TIE_FRACTION` of the runs tie at the modal value of an accuracy outcome. `equivalence_verdict` is its
counterpart for a claim that two accuracies agree. `verdict_rows` applies them to every claim the results can speak
to; nothing is recomputed but a least-squares line through the sweep's points and a modal-tie fraction.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats  # a dependency of jax
from .schema import is_number, is_skipped
from .stats import modal_tie_fraction

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
CONFIDENCE = 0.95  # the level of every interval a verdict reads
CORRELATION_NULL_BAND = 0.2  # |ρ| below this is "no effect" (docs/study-design.md)
SLOPE_NULL_BAND = 0.1  # a log-log slope against λ this flat is "no effect"
ACCURACY_MARGIN = 0.05  # KRR and fine-tuned eval accuracy "agree" when their difference lies within ±this
MAX_TIE_FRACTION = 0.2  # above this share of runs at the modal eval accuracy, a correlation ranks ties
MIN_UNITS = 10  # fewer independent units (configurations under a cluster bootstrap, else runs) decide nothing
MIN_LAMBDAS = 3  # a slope's interval needs at least one residual degree of freedom
KAPPA = "kappa"  # κ = μ_max/μ_min at σ = 0 (jaxlin.spectrum.kernel_statistics)


def as_float(value) -> float:
    """A number of the results (a float, or "inf"/"nan") as a float; a label, None or a missing value is nan."""
    return float(value) if is_number(value) else math.nan


def interval_verdict(lo: float, hi: float, expected_sign: int, *, null_band: float, units: int | None = None,
                     min_units: int = MIN_UNITS, unit_name: str = "independent units",
                     tie_fraction: float = 0.0) -> tuple[str, str]:
    """(verdict, reason) for an effect whose `CONFIDENCE` interval is [lo, hi] and whose claim predicts the sign
    `expected_sign` (+1 or −1); `units` independent units behind it (None: not counted), `tie_fraction` the share
    of runs at the modal outcome. The rule of the module docstring."""
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign={expected_sign!r} must be +1 or -1")
    if units is not None and units < min_units:
        return INCONCLUSIVE, f"only {units} {unit_name} (need ≥ {min_units})"
    if tie_fraction > MAX_TIE_FRACTION:
        return INCONCLUSIVE, (f"{tie_fraction:.0%} of runs tie at the modal eval accuracy "
                              f"(more than {MAX_TIE_FRACTION:.0%}): the correlation ranks ties")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, "no finite interval"
    if lo > 0 or hi < 0:
        side = 1 if lo > 0 else -1
        if side == expected_sign:
            return SUPPORTED, f"the {CONFIDENCE:.0%} interval excludes 0 with the predicted sign"
        return NOT_SUPPORTED, f"the {CONFIDENCE:.0%} interval excludes 0 with the opposite sign"
    if -null_band <= lo and hi <= null_band:
        return NOT_SUPPORTED, f"the {CONFIDENCE:.0%} interval lies within ±{null_band:g} (no effect)"
    return INCONCLUSIVE, f"the {CONFIDENCE:.0%} interval includes 0 and reaches past ±{null_band:g}"


def correlation_verdict(result: dict, expected_sign: int, *, tie_fraction: float = 0.0) -> tuple[str, str]:
    """`interval_verdict` on the Spearman ρ of a `jaxlin.stats.correlation` result (as stored in results.json);
    the units are its `n_groups` under a cluster bootstrap, else its `n`."""
    if result.get("reason"):
        return INCONCLUSIVE, str(result["reason"])
    units = result.get("n_groups", result["n"]) if result.get("resampling") == "groups" else result["n"]
    lo, hi = (float(v) for v in result["spearman_ci"])
    return interval_verdict(lo, hi, expected_sign, null_band=CORRELATION_NULL_BAND, units=int(units),
                            tie_fraction=tie_fraction)


def equivalence_verdict(lo: float, hi: float, margin: float) -> tuple[str, str]:
    """(verdict, reason) for a claim that two quantities agree, from the `CONFIDENCE` interval [lo, hi] of their
    difference: "supported" inside ±`margin`, "not supported" wholly beyond it, "inconclusive" otherwise."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, "no finite interval"
    if -margin <= lo and hi <= margin:
        return SUPPORTED, f"the {CONFIDENCE:.0%} interval of the difference lies within ±{margin:g}"
    if lo > margin or hi < -margin:
        return NOT_SUPPORTED, f"the {CONFIDENCE:.0%} interval of the difference lies beyond ±{margin:g}"
    return INCONCLUSIVE, f"the {CONFIDENCE:.0%} interval of the difference reaches past ±{margin:g}"


def slope_interval(x, y) -> tuple[float, float, float, int]:
    """(slope, lo, hi, n) of the least-squares line of log y against log x over the pairs with x, y > 0 and
    finite: the `CONFIDENCE` interval is slope ± t·SE with n − 2 degrees of freedom (nan when n < 3)."""
    x, y = np.asarray([float(v) for v in x]), np.asarray([float(v) for v in y])
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    n = int(lx.size)
    if n < 2 or np.ptp(lx) == 0:
        return math.nan, math.nan, math.nan, n
    slope, intercept = np.polyfit(lx, ly, 1)
    if n < 3:
        return float(slope), math.nan, math.nan, n
    resid = ly - (intercept + slope * lx)
    se = math.sqrt(float(resid @ resid) / (n - 2) / float(np.sum((lx - lx.mean()) ** 2)))
    half = float(scipy_stats.t.ppf((1 + CONFIDENCE) / 2, n - 2)) * se
    return float(slope), float(slope) - half, float(slope) + half, n


def too_few_lambdas(n: int) -> str:
    """Why a log-log slope over `n` usable λ values has no interval, hence no verdict: the one wording of it."""
    return f"needs ≥ {MIN_LAMBDAS} λ values (have {n})"


def difference_interval(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """(p1 − p2, lo, hi): the Wald `CONFIDENCE` interval of a difference of two accuracies on n1 and n2 examples,
    treated as independent samples (conservative when they share examples)."""
    z = float(scipy_stats.norm.ppf((1 + CONFIDENCE) / 2))
    d = p1 - p2
    half = z * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return d, d - half, d + half


def _row(claim, test, verdict, reason, statistic, source, run_hint=None):
    return {"claim": claim, "test": test, "verdict": verdict, "reason": reason, "statistic": statistic,
            "source": source, "run": run_hint}


def _fmt(v, digits=2) -> str:
    v = float(v)
    return f"{v:+.{digits}f}" if math.isfinite(v) else "nan"


def _ci(lo, hi) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


CLAIM_LINEAR = "(a) fine-tuning with the pull toward θ0 behaves like its linearization"
CLAIM_KAPPA = "(b) the NTK spectrum at θ0 (κ) predicts fine-tuning"
CLAIM_KRR = "(c) the kernel predictor (no training) reaches the fine-tuned eval accuracy"


def _missing(claim, test, stage, source):
    return _row(claim, test, INCONCLUSIVE, f"the {stage} stage did not run (or was skipped)", "—", source,
                f"run the {stage} stage: jaxlin run --stages {stage},report")


def _sweep_row(results: dict, source: str) -> dict:
    test = "sweep: lin–nonlin output distance ‖f − f̄‖ falls as λ grows (log-log slope < 0)"
    sweep = results.get("sweep") or []
    if not sweep:
        return _missing(CLAIM_LINEAR, test, "sweep", source)
    lambdas = [p["lambda"] for p in sweep]
    slope, lo, hi, n = slope_interval(lambdas, [p["output_distance_lin_nonlin"] for p in sweep])
    theta = slope_interval(lambdas, [p["theta_distance_lin_nonlin"] for p in sweep])[0]
    theta_text = f"‖θ − θ̄‖ slope {_fmt(theta)}"
    if n < MIN_LAMBDAS:
        few = too_few_lambdas(n)
        return _row(CLAIM_LINEAR, test, INCONCLUSIVE, f"the slope's {CONFIDENCE:.0%} interval {few}",
                    f"slope {_fmt(slope)}, no interval ({few}); {theta_text}", source,
                    f"sweep ≥ {MIN_LAMBDAS} λ values: --lambdas 0.5,5,50")
    statistic = f"slope {_fmt(slope)} {_ci(lo, hi)}, n = {n} λ values; {theta_text}"
    verdict, reason = interval_verdict(lo, hi, -1, null_band=SLOPE_NULL_BAND)
    return _row(CLAIM_LINEAR, test, verdict, reason, statistic, source)


def _study_runs(results: dict) -> list:
    corr = results.get("correlation")
    return [] if corr is None or is_skipped(corr) else corr["runs"]


def _tie_fraction(runs, key="eval_accuracy") -> float:
    values = [v for v in (as_float(r.get(key)) for r in runs) if math.isfinite(v)]
    return modal_tie_fraction(values) if values else math.nan


def _study_row(results, claim, test, predictor, outcome, sign, source, extra=""):
    runs = _study_runs(results)
    if not runs:
        return _missing(claim, test, "study", source)
    result = results["correlation"]["results"].get(predictor, {}).get(outcome)
    if result is None:
        return _row(claim, test, INCONCLUSIVE, f"the study's results hold no {predictor} vs {outcome} correlation",
                    "—", source, "rerun the study stage with this version of jaxlin")
    ties = {k: _tie_fraction(runs, k) for k in (predictor, outcome) if k.endswith("accuracy")}
    tie = max((t for t in ties.values() if math.isfinite(t)), default=0.0)
    verdict, reason = correlation_verdict(result, sign, tie_fraction=tie)
    units = (f", {result['n_groups']} configurations" if result.get("resampling") == "groups" else "")
    tie_text = "; ".join(f"modal tie of {k}: {t:.0%}" for k, t in ties.items() if math.isfinite(t))
    rho, ci = as_float(result["spearman"]), _ci(*map(as_float, result["spearman_ci"]))
    statistic = (f"Spearman ρ = {_fmt(rho)} {ci}, "
                 f"n = {result['n']} runs{units}" + (f"; {tie_text}" if tie_text else "") + extra)
    return _row(claim, test, verdict, reason, statistic, source)


def _krr_row(results: dict, source: str) -> dict:
    test = "krr + sweep: best KRR eval accuracy within ±%g of the best fine-tuned one" % ACCURACY_MARGIN
    krr, sweep = results.get("krr"), results.get("sweep") or []
    if krr is None or is_skipped(krr):
        return _missing(CLAIM_KRR, test, "krr", source)
    if not sweep:
        return _missing(CLAIM_KRR, test, "sweep", source)
    pairs = [(float(r), float(a)) for r, a in zip(krr["ridges"], krr["eval_accuracy"]) if math.isfinite(float(a))]
    tuned = [(float(p["lambda"]), as_float(p["eval_accuracy_nonlinear"])) for p in sweep]
    tuned = [t for t in tuned if math.isfinite(t[1])]
    if not pairs or not tuned:
        return _row(CLAIM_KRR, test, INCONCLUSIVE, "no finite KRR or fine-tuned eval accuracy", "—", source)
    ridge, p_krr = max(pairs, key=lambda p: p[1])
    lam, p_tuned = max(tuned, key=lambda p: p[1])
    n_krr = int(krr.get("num_eval", results["data"]["num_eval"]))
    n_tuned = int(results["data"]["num_eval"])
    d, lo, hi = difference_interval(p_krr, n_krr, p_tuned, n_tuned)
    verdict, reason = equivalence_verdict(lo, hi, ACCURACY_MARGIN)
    statistic = (f"KRR {p_krr:.3f} (λ = {ridge:.3g}, {n_krr} eval) − fine-tuned {p_tuned:.3f} (λ = {lam:.3g}, "
                 f"{n_tuned} eval) = {_fmt(d, 3)} {_ci(lo, hi)}")
    return _row(CLAIM_KRR, test, verdict, reason, statistic, source)


def verdict_rows(results: dict) -> list[dict]:
    """One dict per tested claim: claim, test, verdict, reason, statistic (with its interval and n), source (model
    and data) and run (what to run when a stage is missing, else None), from a validated results dict."""
    model, data = results["model"], results["data"]
    source = f"{model['source']} ({model['family']}); {data['dataset']}, {data['num_eval']} eval examples"
    runs = _study_runs(results)
    agree = [a for a in (as_float(r.get("krr_agreement")) for r in runs) if math.isfinite(a)]
    agreement = f"; mean KRR–fine-tuned argmax agreement {np.mean(agree):.3f}" if agree else ""
    study = results["config"].get("study", {})
    preset = f", study preset {study['preset']!r}" if isinstance(study, dict) and "preset" in study else ""
    correlation = results.get("correlation")
    study_data = correlation.get("data", data) if isinstance(correlation, dict) else data
    own = study.get("dataset") if isinstance(study, dict) else None  # study.dataset, when the study did not run
    if is_skipped(correlation) and own:
        study_source = f"{model['source']}; {own} (the study’s own data){preset}"
    else:
        study_source = (f"{model['source']}; {study_data['dataset']}, {study_data['num_eval']} eval examples"
                        f"{' (the study’s own data)' if study_data['dataset'] != data['dataset'] else ''}{preset}")
    return [
        _sweep_row(results, source),
        _study_row(results, CLAIM_LINEAR, "study: Spearman(KRR eval accuracy, fine-tuned eval accuracy) > 0 (H3)",
                   "krr_eval_accuracy", "eval_accuracy", 1, study_source, agreement),
        _study_row(results, CLAIM_KAPPA, "study: Spearman(κ, eval accuracy) < 0 (H2)", KAPPA, "eval_accuracy", -1,
                   study_source),
        _study_row(results, CLAIM_KAPPA, "study: Spearman(κ, final train loss) > 0 (H1)", KAPPA, "final_train_loss",
                   1, study_source),
        _krr_row(results, source),
    ]
