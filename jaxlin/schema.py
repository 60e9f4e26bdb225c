"""The results.json contract of `jaxlin run` (version "jaxlin.results/2"); docs/results-schema.md describes it.

`validate_results(obj)` checks a loaded results dict by hand (no jsonschema dependency): strict on required
keys and on types, permissive on extra keys. The first problem raises `SchemaError` whose message starts with
the JSON path of the bad value, e.g. ``sweep[2].lambda: expected a number, got 'x'``.

Numbers are ints or floats (never bools) or one of the strings "inf", "-inf", "nan", which is how
`jaxlin._util.to_jsonable` writes non-finite floats. A skipped stage is ``{"skipped": "<reason>"}`` for a dict
section and ``[]`` for `sweep`. `example_results()` returns a small, complete synthetic results dict.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np

from ._util import to_jsonable
from .spectrum import condition_numbers, kernel_statistics
from .stats import correlation

SCHEMA_VERSION = "jaxlin.results/2"
NONFINITE_STRINGS = ("inf", "-inf", "nan")
OUTCOMES = ("final_train_loss", "eval_accuracy")

Check = Callable[[Any, str], None]


class SchemaError(ValueError):
    """A results dict breaks the results.json contract; the message starts with the JSON path of the problem."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, value) -> None:
    raise SchemaError(f"{path}: expected {expected}, got {_show(value)}")


def _child(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def is_number(value) -> bool:
    """True for an int or float (not a bool) or one of the strings "inf", "-inf", "nan"."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in NONFINITE_STRINGS


def number(value, path: str) -> None:
    if not is_number(value):
        _fail(path, 'a number (or "inf"/"-inf"/"nan")', value)


def integer(value, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(path, "an integer", value)


def string(value, path: str) -> None:
    if not isinstance(value, str):
        _fail(path, "a string", value)


def boolean(value, path: str) -> None:
    if not isinstance(value, bool):
        _fail(path, "true or false", value)


def string_or_null(value, path: str) -> None:
    if value is not None and not isinstance(value, str):
        _fail(path, "a string or null", value)


def number_or_string(value, path: str) -> None:
    if not (is_number(value) or isinstance(value, str)):
        _fail(path, "a number or a string", value)


def list_of(item: Check, length: int | None = None) -> Check:
    """A check for a JSON list whose every item passes `item` (and has `length` items when given)."""
    def check(value, path):
        if not isinstance(value, list):
            _fail(path, "a list", value)
        if length is not None and len(value) != length:
            _fail(path, f"a list of {length} items", value)
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")
    return check


def dict_of(item: Check) -> Check:
    """A check for a JSON object with string keys whose every value passes `item`."""
    def check(value, path):
        _dict(value, path)
        for k, v in value.items():
            item(v, _child(path, k))
    return check


def _dict(value, path: str) -> None:
    if not isinstance(value, dict):
        _fail(path, "an object", value)


def record(required: dict[str, Check], optional: dict[str, Check] | None = None,
           same_length: tuple[str, ...] = ()) -> Check:
    """A check for a JSON object with `required` and `optional` keys (extra keys allowed); the lists named in
    `same_length` must all have as many items as the first one."""
    def check(value, path):
        _dict(value, path)
        for key, item in required.items():
            if key not in value:
                raise SchemaError(f"{_child(path, key)}: required key missing; add it (see docs/results-schema.md)")
            item(value[key], _child(path, key))
        for key, item in (optional or {}).items():
            if key in value:
                item(value[key], _child(path, key))
        present = [k for k in same_length if k in value]
        for key in present[1:]:
            if len(value[key]) != len(value[present[0]]):
                raise SchemaError(f"{_child(path, key)}: has {len(value[key])} items but {present[0]} has "
                                  f"{len(value[present[0]])}; write one value per {present[0]} entry")
    return check


def skippable(check: Check) -> Check:
    """`check`, or a skipped stage: exactly an object {"skipped": "<reason>"}."""
    def wrapped(value, path):
        if isinstance(value, dict) and "skipped" in value:
            string(value["skipped"], _child(path, "skipped"))
            return
        check(value, path)
    return wrapped


def descending(value, path: str) -> None:
    list_of(number)(value, path)
    finite = [(i, float(v)) for i, v in enumerate(value) if math.isfinite(float(v))]
    for (_, a), (i, b) in zip(finite, finite[1:]):
        if b > a:
            raise SchemaError(f"{path}[{i}]: eigenvalues must be in descending order, but {b!r} follows {a!r}; "
                              "sort them largest first")


def schema_version(value, path: str) -> None:
    if value != SCHEMA_VERSION:
        raise SchemaError(f"{path}: expected {SCHEMA_VERSION!r}, got {_show(value)}; this jaxlin reads only "
                          f"{SCHEMA_VERSION} results: rerun `jaxlin run` with this version")


NUMBERS = list_of(number)
STRINGS = list_of(string)

STATISTICS = {k: number for k in ("kappa", "kappa_sigma_abs", "kappa_sigma_trace", "mu_max", "mu_min", "trace",
                                   "effective_rank", "stable_rank")}  # of spectrum.kernel_statistics
STATS = record({"eigenvalues": descending, **STATISTICS})
SIGN_STATS = record({"singular_values": descending, **STATISTICS})
KAPPA_SIGMA = record({"sigmas": NUMBERS, "kappa_sigma": NUMBERS}, same_length=("sigmas", "kappa_sigma"))
CONFIGURATION = record({"modules": STRINGS, "family": string, "stats": STATS},
                       {"sign_stats": SIGN_STATS, "kappa_sigma": KAPPA_SIGMA})
KRR = record({"configuration": string, "ridges": NUMBERS, "ridge_scale": string, "eval_accuracy": NUMBERS,
              "train_accuracy": NUMBERS, "objective": NUMBERS},
             same_length=("ridges", "eval_accuracy", "train_accuracy", "objective"))
DYNAMICS = record({"steps": list_of(integer), "learning_rate": number, "ridge": number, "predicted_loss": NUMBERS,
                   "measured_loss_linearized": NUMBERS, "measured_loss_nonlinear": NUMBERS},
                  same_length=("steps", "predicted_loss", "measured_loss_linearized", "measured_loss_nonlinear"))
SWEEP_POINT = record({k: number for k in (
    "lambda", "theta_distance_to_init", "theta_distance_lin_nonlin", "output_distance_lin_nonlin",
    "eval_accuracy_nonlinear", "eval_accuracy_linearized", "theorem2_radius")},
    {"loss_curve_nonlinear": NUMBERS, "loss_curve_linearized": NUMBERS})
ESTIMATE = record({"L_avg": NUMBERS, "L_upper": NUMBERS, "L_std": NUMBERS}, same_length=("L_avg", "L_upper", "L_std"))
PROBE = record({"radii": NUMBERS, "estimates": dict_of(ESTIMATE)})
OPTIONAL_OUTCOMES = {k: number for k in ("eval_macro_f1", "krr_eval_accuracy", "krr_eval_macro_f1",
                                          "krr_agreement")}  # of a study run; older results lack them
RUN = record({"configuration": string, "seed": integer, "modules": STRINGS, "statistics": dict_of(number_or_string),
              "final_train_loss": number, "eval_accuracy": number}, OPTIONAL_OUTCOMES)
CORRELATION_RESULT = record({"pearson": number, "spearman": number, "pearson_ci": list_of(number, 2),
                             "spearman_ci": list_of(number, 2), "n": integer}, {"reason": string_or_null})
METHOD = record({"modules": STRINGS}, {"scores": NUMBERS, "final_train_loss": number, "eval_accuracy": number,
                                      **OPTIONAL_OUTCOMES})
SELECTION = record({"budget": integer, "methods": dict_of(METHOD)},
                   {"seed": integer, "sigma": number, "sigma_scale": string, "ridge": number})
DATA = record({"dataset": string, "num_train": integer, "num_eval": integer, "num_calibration": integer,
               "label_names": STRINGS})
CORRELATION = record({"runs": list_of(RUN), "results": dict_of(dict_of(CORRELATION_RESULT))},
                     {"selection": SELECTION, "results_by_configuration": dict_of(dict_of(CORRELATION_RESULT)),
                      "data": DATA})  # the study's data (its own with study.dataset)
CANARY = record({"relative_error": number, "tolerance": number, "passed": boolean})
BACKEND_CHECK = record({"passed": boolean, "status": string, "jax": string, "jaxlib": string, "backend": string,
                        "device_kind": string, "canaries": dict_of(CANARY), "message": string})
ENVIRONMENT = record({**{k: string for k in ("jaxlin", "jax", "jaxlib", "flax", "optax", "python", "platform")},
                      "devices": STRINGS, "x64": boolean}, {"backend_check": BACKEND_CHECK})
MODEL = record({"source": string, "family": string, "num_layers": integer, "modules": STRINGS,
                "num_trainable_params": integer})



def number_or_null(value, path: str) -> None:
    if value is not None:
        number(value, path)


READOUT = record({"kind": string, "trained": boolean, "zero_shot_eval_accuracy": number_or_null,
                  "zero_shot_num_eval": integer},
                 {"head": string, "label_words": STRINGS, "token_ids": list_of(integer), "template": string})

def fraction(value, path: str) -> None:
    if not (is_number(value) and 0 < value <= 1):
        _fail(path, "a number in (0, 1]", value)


EFFICIENCY = record({"compile_cache": string_or_null, "compile_seconds": dict_of(number),
                     "compute_seconds": dict_of(number), "compiled_programs": dict_of(integer),
                     "cache_hits": dict_of(integer), "token_fill": dict_of(fraction)},
                    {"tokens": dict_of(record({"real": integer, "processed": integer}))})

INPUTS = record({k: string for k in ("config", "dataset", "checkpoint", "jaxlin", "format")})
STAGE_RECORD = record({"key": string, "reused": boolean, "seconds": number, "finished": string})

RESULTS = record(
    {"schema": schema_version, "jaxlin_version": string, "config": record({"preset": string}),
     "environment": ENVIRONMENT, "timings": dict_of(number), "variants": dict_of(string), "data": DATA,
     "model": MODEL, "spectrum": skippable(dict_of(CONFIGURATION)), "krr": skippable(KRR),
     "sweep": list_of(SWEEP_POINT), "probe": skippable(PROBE), "correlation": skippable(CORRELATION),
     "selection": skippable(SELECTION), "arrays": string},
    {"dynamics": skippable(DYNAMICS), "sweep_summary": skippable(dict_of(number)), "readout": READOUT,
     "efficiency": EFFICIENCY,
     "inputs": INPUTS,
     "stages": dict_of(STAGE_RECORD)})


def validate_results(obj) -> None:
    """Raise `SchemaError` (a ValueError) naming the JSON path of the first way `obj` breaks the results.json
    contract of `SCHEMA_VERSION`; return None when it conforms."""
    if not isinstance(obj, dict):
        raise SchemaError(f"$: expected a results object (dict), got {type(obj).__name__}; pass the parsed "
                          "results.json")
    RESULTS(obj, "")


def is_skipped(section) -> bool:
    """True for a missing (None), skipped ({"skipped": ...}) or empty section."""
    return section is None or (isinstance(section, dict) and "skipped" in section) or len(section) == 0


def _spectrum_entry(eigs, modules, family):
    eigs = np.sort(np.asarray(eigs, np.float64))[::-1]
    return {"modules": list(modules), "family": family,
            "stats": {"eigenvalues": eigs, **kernel_statistics(np.diag(eigs))}}


def _example_spectrum(rng, modules):
    n, spectrum = 12, {}
    for i, m in enumerate(modules):
        spectrum[m] = _spectrum_entry(np.geomspace(1.0, 10.0 ** -(2 + i), n) * (1 + i), [m], "single")
    spectrum["layer0"] = _spectrum_entry(np.geomspace(2.0, 1e-3, n), modules[:2], "layer")
    spectrum["rank_deficient"] = _spectrum_entry(np.r_[np.geomspace(1.0, 1e-2, n - 2), 0.0, 0.0], modules[2:],
                                                 "top_k")
    all_eigs = sum(np.geomspace(1.0, 10.0 ** -(2 + i), n) * (1 + i) for i in range(len(modules)))
    spectrum["all"] = _spectrum_entry(all_eigs + 1e-3 * rng.random(n), modules, "all")
    sv = np.asarray(spectrum["all"]["stats"]["eigenvalues"]) * 1.5
    spectrum["all"]["sign_stats"] = {"singular_values": sv, **kernel_statistics(np.diag(sv), kernel="sign")}
    spectrum["all"]["kappa_sigma"] = condition_numbers(np.diag(spectrum["all"]["stats"]["eigenvalues"]))
    return spectrum


def _example_sweep(rng):
    sweep = []
    for lam in (1e-3, 1e-2, 1e-1, 1.0):
        curve = 0.7 * np.exp(-np.arange(20) / (4 + 10 * lam)) + 0.05 + 0.2 * lam / (1 + lam)
        sweep.append({"lambda": lam, "theta_distance_to_init": lam ** -0.5,
                      "theta_distance_lin_nonlin": 0.05 * lam ** -1.5, "output_distance_lin_nonlin": 0.02 / lam,
                      "eval_accuracy_nonlinear": 0.85 - 0.1 * lam, "eval_accuracy_linearized": 0.8 - 0.1 * lam,
                      "theorem2_radius": math.sqrt(2 * 0.69 / lam), "loss_curve_nonlinear": curve,
                      "loss_curve_linearized": curve * (1 + 0.05 * rng.random(20))})
    lams = np.log([s["lambda"] for s in sweep])
    keys = ("theta_distance_to_init", "theta_distance_lin_nonlin", "output_distance_lin_nonlin", "theorem2_radius")
    summary = {k: float(np.polyfit(lams, np.log([s[k] for s in sweep]), 1)[0]) for k in keys}
    return sweep, summary


def _example_correlation(rng, spectrum):
    runs = []
    for name in ("layer0", "all", "layer0.query", "layer1.value"):
        kappa = float(spectrum[name]["stats"]["kappa"])
        for seed in (0, 1):
            runs.append({"configuration": name, "seed": seed, "modules": spectrum[name]["modules"],
                         "statistics": {"kappa": kappa * (1 + 0.1 * rng.random()),
                                        "effective_rank": spectrum[name]["stats"]["effective_rank"],
                                        "sigma_scale": "absolute"},
                         "final_train_loss": 0.1 + 0.05 * math.log10(kappa) + 0.02 * rng.random(),
                         "eval_accuracy": 0.9 - 0.03 * math.log10(kappa) + 0.01 * rng.random()})
    for run in runs:  # the KRR predictor of the run's kernel, no training
        run.update(krr_eval_accuracy=run["eval_accuracy"] - 0.01 * (1 + run["seed"]), krr_agreement=0.9)
    results = {stat: {out: correlation([r["statistics"][stat] for r in runs], [r[out] for r in runs],
                                       n_bootstrap=200) for out in OUTCOMES}
               for stat in ("kappa", "effective_rank")}
    results["krr_eval_accuracy"] = {out: correlation([r["krr_eval_accuracy"] for r in runs],
                                                     [r[out] for r in runs], n_bootstrap=200) for out in OUTCOMES}
    results["mu_min"] = {out: correlation([1.0, 1.0], [0.0, 1.0]) for out in OUTCOMES}  # degenerate: nan
    return {"runs": runs, "results": results}


def example_results() -> dict:
    """A small but complete synthetic results dict (every section filled, a few non-finite values) that
    passes `validate_results`; for tests and for trying the report without a run."""
    rng = np.random.default_rng(0)
    modules = ["layer0.query", "layer0.value", "layer1.query", "layer1.value"]
    spectrum = _example_spectrum(rng, modules)
    sweep, summary = _example_sweep(rng)
    ridges = np.geomspace(1e-4, 1e1, 6)
    steps = list(range(0, 50, 5))
    predicted = 0.69 * np.exp(-np.asarray(steps) / 15.0) + 0.1
    selection = {"budget": 2, "seed": 0, "sigma": 1e-4, "sigma_scale": "trace", "ridge": 1e-3, "methods": {
        "greedy_kappa": {"modules": ["layer0.query", "layer1.value"], "scores": [120.0, 85.5]},
        "top_layers": {"modules": ["layer1.query", "layer1.value"], "scores": []},
        "random": {"modules": ["layer0.value", "layer1.query"], "scores": []}}}
    results = {
        "schema": SCHEMA_VERSION, "jaxlin_version": "0.1.0",
        "config": {"preset": "example", "model": {"name": "synthetic", "seed": 0}, "study": {"seeds": [0, 1]},
                   "kernel": {"krr_ridges": [1e-2]}, "stages": ["ntk", "spectrum", "report"]},
        "environment": {"jaxlin": "0.1.0", "jax": "0.0", "jaxlib": "0.0", "flax": "0.0", "optax": "0.0",
                        "python": "3.12", "platform": "cpu", "devices": ["TFRT_CPU_0"], "x64": True,
                        "backend_check": {"passed": True, "status": "ok", "jax": "0.0", "jaxlib": "0.0",
                                          "backend": "cpu", "device_kind": "cpu", "message": "example",
                                          "canaries": {"broadcast_reduce/float32": {
                                              "relative_error": 1.7e-7, "tolerance": 1e-4, "passed": True}}}},
        "timings": {"load": 1.5, "ntk": 12.25, "sweep": 40.0, "probe": 3.0},
        "efficiency": {"compile_cache": "/tmp/.jaxlin-cache", "compile_seconds": {"ntk": 2.5, "sweep": 6.0},
                       "compute_seconds": {"ntk": 9.75, "sweep": 34.0}, "compiled_programs": {"ntk": 3, "sweep": 12},
                       "cache_hits": {"ntk": 0, "sweep": 4}, "token_fill": {"ntk": 0.5, "sweep": 0.8},
                       "tokens": {"ntk": {"real": 192, "processed": 384}, "sweep": {"real": 4000, "processed": 5000}}},
        "variants": {"kernel": "jjt", "calibration_selection": "first", "ridge_scale": "trace",
                     "regularizer": "prox", "anchor": "init", "loss": "mse", "head": "frozen", "padding": "bucketed"},
        "data": {"dataset": "synthetic/sst2-like", "num_train": 64, "num_eval": 32, "num_calibration": 12,
                 "label_names": ["negative", "positive"]},
        "model": {"source": "synthetic://tiny-bert", "family": "bert", "num_layers": 2, "modules": modules,
                  "num_trainable_params": 4096},
        "readout": {"kind": "head", "head": "roberta", "trained": True, "zero_shot_eval_accuracy": 0.5,
                    "zero_shot_num_eval": 32},
        "spectrum": spectrum,
        "krr": {"configuration": "all", "ridges": ridges, "ridge_scale": "trace",
                "eval_accuracy": 0.6 + 0.2 * np.exp(-(np.log10(ridges) + 2) ** 2),
                "train_accuracy": 1.0 - 0.05 * np.log10(ridges / 1e-4), "objective": 0.3 * ridges / (1 + ridges)},
        "dynamics": {"steps": steps, "learning_rate": 0.1, "ridge": 1e-2, "predicted_loss": predicted,
                     "measured_loss_linearized": predicted * 1.01, "measured_loss_nonlinear": predicted * 1.1},
        "sweep": sweep, "sweep_summary": summary,
        "probe": {"radii": [1e-3, 1e-2, 1e-1, 1.0],
                  "estimates": {"jacobian": {"L_avg": [0.5, 0.52, 0.6, 0.9], "L_upper": [0.7, 0.75, 0.8, 1.3],
                                             "L_std": [0.05, 0.05, 0.06, 0.1]},
                                "remainder": {"L_avg": [0.3, 0.31, 0.35, 0.5], "L_upper": [0.4, 0.4, 0.5, 0.8],
                                              "L_std": [0.02, 0.02, 0.03, 0.05]}}},
        "correlation": {**_example_correlation(rng, spectrum), "selection": {**selection, "methods": {
            "greedy_kappa": {**selection["methods"]["greedy_kappa"], "final_train_loss": 0.21, "eval_accuracy": 0.83},
            "top_layers": {**selection["methods"]["top_layers"], "eval_accuracy": 0.8},
            "random": {"modules": ["layer0.query", "layer1.query"], "scores": []}}}},  # the study drew another set
        "selection": selection,
        "arrays": "arrays.npz",
        "inputs": {"config": "3f2a9c0d1e4b5a6f", "dataset": "ab" * 32, "checkpoint": "cd" * 32, "jaxlin": "0.1.0",
                   "format": SCHEMA_VERSION},
        "stages": {"ntk": {"key": "0123456789abcdef", "reused": True, "seconds": 12.25,
                           "finished": "2026-01-01T00:00:00+00:00"},
                   "sweep": {"key": "fedcba9876543210", "reused": False, "seconds": 40.0,
                             "finished": "2026-01-01T00:01:00+00:00"}},
    }
    return to_jsonable(results)
