"""The κ–performance study: do spectral statistics of the LoRA eNTK at init predict fine-tuning? (docs/paper.md §5, §6.3, §9)

For every layer configuration S and LoRA seed, `run_study` computes statistics of K_S = Σ_{m∈S} K_m on the
calibration examples before any training, fine-tunes LoRA on S for a fixed budget, and correlates the two; then
it trains greedy spectral selections and baselines of `selection_budget` modules on the same setup.

No recompilation across configurations and seeds. Per seed, LoRA sits on ALL candidate modules (B0 = 0, so an
inactive module leaves the function unchanged, docs/paper.md §5.4 item 1) and a configuration is a 0/1 gate per
module, `gate_M`, an array leaf of the model function `adapted.as_function(gate=gate_M)`: module m's (a, b) enter
the model as g_m·x + (1 − g_m)·stop_gradient(x), the same value, with zero gradient where g_m = 0, so under Adam
(no weight decay, no pull) an inactive module stays bit-exactly at init. One Adapted (of the first seed; the others
only swap A0 values) and one optimiser, handed to `train.fit`, serve every run, so all runs share one compiled
train step and one eval forward per padded length, whichever objective (`run_study(objective=)`) they train. One
`module_ntks` pass gives, for every seed, the full (N, N, O, O) float64 kernel of every candidate module (float32
tiles unless jax_enable_x64): at init B0 = 0, so the seeds share every forward and backward pass and differ only in
their LoRA features (`module_ntks` with a list of trainables); a smaller calibration set that is a prefix of the larger one (modes "first", "random")
takes its leading block. With `StudyConfig.frozen_prefix` the kernel passes and f0 run from the candidates' lowest
block (`module_ntks(start_layer=)`), on the hidden states below it that the runs starting there read too: one
`jaxlin.prefix.FrozenPrefix` per block, computed once per example for the kernels, the runs and every seed.

Statistics: `spectrum.kernel_statistics` (the paper's exact choice is unknown, docs/paper.md §0, so each is
reported), with r0 = onehot(y) − f0 on the calibration set for the ridge objective. Names: plain for the first
kernel on `num_calibration` examples, "<kernel>_n<N>.<name>" for the other variants.
KRR test of the linearization claim (docs/study-design.md): one more `module_ntks` pass gives each seed's cross
kernels K_m(E, X) of the eval examples E with the largest calibration set X, and every configuration's kernel
regressor f0(E) + K_S(E, X)(K_S(X, X) + λI)⁻¹ r0 (`solve.kernel_ridge`, λ = ridge_trace·trace(K_S)/(N·O), no
training) predicts eval labels; its accuracy `krr_eval_accuracy` is correlated with the outcomes like a statistic.
Selections: `select.spectral_selection` on the primary variant's kernels, σ in `sigma_scale` (default "trace":
sigma_trace·trace(K)/(N·O); "absolute": sigma_absolute), each trained with the first seed.

Result of `run_study` (JSON-ready; non-finite floats are the strings "inf", "-inf", "nan"):
  config: the StudyConfig fields.   variants: {"statistic_sets": {variant: {kernel, num_calibration, prefix}},
    primary, candidates, objective (what the runs trained: "classification" or "next_token"), and the recorded
    choices (calibration, kernel layout, head, σ, ridge, outcomes)}.
  runs: [{configuration, seed, modules, statistics: {name: float}, final_train_loss (mean cross-entropy over the
    first num_train_evaluated (default: all num_train) training examples after training), train_loss_last10pct
    (mean batch loss of the last 10% of steps), train_accuracy, eval_accuracy, eval_loss, eval_macro_f1,
    train_loss_curve: [per step], prefix_start_layer (the block training started from,
    `StudyConfig.frozen_prefix`; 0: the whole model), wall_time_s,
    krr_eval_accuracy, krr_eval_macro_f1 (of the KRR predictor on the eval examples), krr_agreement (fraction of
    eval examples where its argmax equals the fine-tuned model's)}].
  results: {predictor: {outcome: stats.correlation dict (pearson, spearman, CIs, n, ...)}} over all runs, for every
    statistic and for `PREDICTORS` (krr_eval_accuracy); the CIs resample whole configurations (resampling
    "groups"), since the seeds of a configuration share its κ.
  results_by_configuration: the same with statistics and outcomes averaged over seeds per configuration.
  selection: `select.spectral_selection`'s {budget, seed, sigma, sigma_scale, ridge, methods: {name: {modules,
    scores (greedy: the score after each step; baselines: []), statistics (of K_S, primary variant), + the outcome
    keys of a run when `train_selections`}}}.
  timings: seconds (ntk, statistics, train, krr, selection, correlations, total) and the number of trained runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from . import data, solve
from .adapters import Adapted, add_lora
from .distributed import process_rows
from .module_ntk import module_ntks
from .prefix import frozen_prefix as prefix_of
from .readout import check_readout
from ._util import to_jsonable
from .select import FAMILIES, configuration_kernel, enumerate_configurations, spectral_selection
from .spectrum import KERNELS, SIGMA_SCALES, STATISTICS, kernel_statistics
from .stats import correlation, macro_f1
from .sweep import ClassificationObjective
from .train import TrainConfig, evaluate, fit, make_optimizer
from .sharding import shard_adapted
from .train_checkpoint import fit_checkpointing
from .train_mesh import MeshPlan

OUTCOMES = ("final_train_loss", "train_loss_last10pct", "eval_accuracy", "eval_loss", "eval_macro_f1")
PREDICTORS = ("krr_eval_accuracy",)  # run-level predictors, correlated with the outcomes like a statistic
CALIBRATION_MODES = ("first", "random", "balanced")
PRESETS = ("smoke", "quick", "default", "powered", "gpu")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes and settings of one study; the defaults are the `"default"` preset's (≤ 30 min on a 2-core CPU).

    configurations: family names of `select.FAMILIES` (union, in order, module sets deduplicated; default the 6
      "layer" (q, k, v of one layer) + 18 "single" configurations of MiniLM) or a dict name → module names.
    targets, layers: the candidate LoRA modules (projection names and layer indices, None = all layers, as
    `add_lora`). seeds: LoRA init seeds (vary A0 only).
    num_calibration / num_calibration_large (None = skip): calibration examples for the statistics, taken from
      the training data by `calibration_mode` ("first" = the first of the (shuffled) split, as the paper).
    rank, alpha: LoRA rank R and scale alpha/R. train_head: train the classification head too (the paper does;
      the NTK excludes it either way).
    steps, batch_size, learning_rate (per step, Adam), warmup_ratio: the fixed training budget, linear schedule.
    max_length, pad_to_multiple_of: tokens per example, padding bucket (fewer buckets = fewer compiles).
    num_train, num_eval: the first examples of the training / eval data used; eval_batch_size for evaluation.
    num_train_evaluated: the first training examples scored after each run (final_train_loss, train_accuracy);
      None = all num_train. Scoring is a forward pass an example, so on a short budget it can cost more than the
      training itself.
    sigma_absolute, sigma_trace, ridge_trace: σ of κ_σ (absolute; relative to trace/(N·O)) and ridge λ relative
      to trace/(N·O) (of the ridge objective and of the KRR predictor). sigma_scale: the σ of the selections,
      "trace" (sigma_trace, scale-fair) or "absolute" (sigma_absolute, the paper's). kernels: "ntk" and
      optionally "sign" (a statistic set each). n_bootstrap: CI resamples.
    selection_budget: modules per selection. train_selections: fine-tune each selection method's modules (with
      the first seed, the study's budget) and record its outcomes; False records only what each method chose,
      its scores and statistics (one seed per method cannot rank methods whose accuracies differ by less than
      the seeds do, and the training costs minutes). data_seed: seeds the (shared) training batch order.
    frozen_prefix: train and evaluate each configuration from its lowest adapted block, and compute the kernels
      and f0 from the candidates' lowest block; the blocks below, gated off (or at B0 = 0) and so the base
      model's, are computed once per example for the kernels, the runs and every seed together (`jaxlin.prefix`;
      the same results up to float rounding, one compiled step per block).
      Off by default: on the short studies measured (the "quick" and "default" budgets) its extra compiles and
      prefix forwards cost more than it saved; on in "powered", whose runs repay it (benchmarks/RESULTS.md).
    """

    configurations: tuple[str, ...] | Mapping[str, Sequence[str]] = ("layer", "single")
    targets: tuple[str, ...] = ("query", "key", "value")
    layers: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    num_calibration: int = 32
    num_calibration_large: int | None = 128
    calibration_mode: str = "first"
    rank: int = 8
    alpha: float = 8.0
    train_head: bool = True
    steps: int = 32
    batch_size: int = 8
    learning_rate: float = 4e-3
    warmup_ratio: float = 0.06
    max_length: int = 48
    pad_to_multiple_of: int = 16
    num_train: int = 256
    num_eval: int = 256
    num_train_evaluated: int | None = None
    eval_batch_size: int = 64
    sigma_absolute: float = 1e-4
    sigma_trace: float = 1e-4
    ridge_trace: float = 1e-4
    sigma_scale: str = "trace"
    kernels: tuple[str, ...] = ("ntk",)
    n_bootstrap: int = 1000
    selection_budget: int = 3
    train_selections: bool = True
    data_seed: int = 0
    frozen_prefix: bool = False

    def __post_init__(self):
        spec = self.configurations
        if isinstance(spec, Mapping):
            if not spec or any(isinstance(v, str) or not v for v in spec.values()):
                _bad("configurations", spec, "a non-empty dict name → non-empty sequence of module names")
        elif isinstance(spec, str) or not spec or any(f not in FAMILIES for f in spec):
            _bad("configurations", spec, f"a non-empty tuple of families from {FAMILIES}, or a dict name → modules")
        if isinstance(self.targets, str) or not self.targets:
            _bad("targets", self.targets, "a non-empty tuple of module names, e.g. ('query', 'key', 'value')")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or not all(_is_int(s) for s in self.seeds):
            _bad("seeds", self.seeds, "a non-empty tuple of distinct integers, e.g. (0, 1, 2)")
        for name, low, high in (("num_calibration", 2, 4096), ("rank", 1, 1024), ("steps", 1, 10**6),
                                ("batch_size", 1, 4096), ("max_length", 2, 8192), ("pad_to_multiple_of", 1, 8192),
                                ("num_train", 1, 10**7), ("num_eval", 1, 10**7), ("eval_batch_size", 1, 4096),
                                ("n_bootstrap", 1, 10**6), ("selection_budget", 1, 4096), ("data_seed", 0, 2**31)):
            if not _is_int(getattr(self, name)) or not low <= getattr(self, name) <= high:
                _bad(name, getattr(self, name), f"an integer in [{low}, {high}]")
        scored = self.num_train_evaluated
        if scored is not None and (not _is_int(scored) or not 1 <= scored <= self.num_train):
            _bad("num_train_evaluated", scored, f"None or an integer in [1, num_train={self.num_train}]")
        large = self.num_calibration_large
        if large is not None and (not _is_int(large) or not self.num_calibration < large <= 65536):
            _bad("num_calibration_large", large, f"None or an integer in ({self.num_calibration}, 65536]")
        if self.sigma_scale not in SIGMA_SCALES:
            _bad("sigma_scale", self.sigma_scale, f"one of {SIGMA_SCALES}")
        if self.calibration_mode not in CALIBRATION_MODES:
            _bad("calibration_mode", self.calibration_mode, f"one of {CALIBRATION_MODES}")
        if isinstance(self.kernels, str) or not self.kernels or self.kernels[0] != "ntk" \
                or len(set(self.kernels)) != len(self.kernels) or any(k not in KERNELS for k in self.kernels):
            _bad("kernels", self.kernels, f"('ntk',) or ('ntk', 'sign'): distinct kernels of {KERNELS}, ntk first")
        for name, ok, allowed in (("alpha", lambda v: v > 0, "> 0"), ("learning_rate", lambda v: v > 0, "> 0"),
                                  ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
                                  ("sigma_absolute", lambda v: v >= 0, "≥ 0"), ("sigma_trace", lambda v: v >= 0, "≥ 0"),
                                  ("ridge_trace", lambda v: v > 0, "> 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                _bad(name, value, f"a finite number {allowed}")
        for name in ("train_head", "frozen_prefix", "train_selections"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False")

    @property
    def variants(self) -> dict[str, dict]:
        """Statistic sets: variant name → {kernel, num_calibration, prefix}; the first has no prefix."""
        sizes = (self.num_calibration,) + (() if self.num_calibration_large is None else (self.num_calibration_large,))
        out = {}
        for kernel in self.kernels:
            for n in sizes:
                out[f"{kernel}_n{n}"] = {"kernel": kernel, "num_calibration": n,
                                         "prefix": "" if not out else f"{kernel}_n{n}."}
        return out

    @property
    def largest_calibration(self) -> int:
        """Examples in the largest calibration set (of the statistics and of the KRR predictor's X)."""
        return max(v["num_calibration"] for v in self.variants.values())


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _bad(name, value, allowed):
    raise ValueError(f"StudyConfig.{name}={value!r} must be {allowed}")


def study_preset(name: str) -> StudyConfig:
    """"smoke" (every step at the smallest sizes that run it: 16 training and 16 eval examples, 4 steps; for
    checking that a model goes through the study, not for its numbers), "quick" (≤ 3 min on a 2-core CPU with
    MiniLM: 6 layer configurations × 1 seed, 16 calibration examples),
    "default" (≤ 30 min: 24 configurations × 3 seeds, 32 + 128 calibration examples), "powered" (the design of
    docs/study-design.md: 24 configurations × 3 seeds on 1,024 training and 1,002 eval examples, a budget that
    trains, 64 steps of 16 at 1e-2, the frozen prefix on, the first 256 training examples scored, the selections
    chosen but not trained) or "gpu" (one
    GPU: 24 configurations plus projections and top-k × 5 seeds, both kernels, a longer budget at real lengths)."""
    if name == "smoke":
        return StudyConfig(configurations=("layer",), seeds=(0,), num_calibration=8, num_calibration_large=None,
                           steps=4, batch_size=4, max_length=32, pad_to_multiple_of=32, num_train=16, num_eval=16,
                           eval_batch_size=16, n_bootstrap=100, selection_budget=1)
    if name == "quick":
        return StudyConfig(configurations=("layer",), seeds=(0,), num_calibration=16, num_calibration_large=None,
                           steps=8, batch_size=8, max_length=32, pad_to_multiple_of=32, num_train=64, num_eval=64,
                           n_bootstrap=200, selection_budget=2)
    if name == "default":
        return StudyConfig()
    if name == "powered":
        return StudyConfig(steps=64, batch_size=16, learning_rate=1e-2, num_train=1024, num_eval=1002,
                           num_train_evaluated=256, frozen_prefix=True, train_selections=False)
    if name == "gpu":
        return StudyConfig(configurations=("layer", "single", "projection", "top_k"), seeds=(0, 1, 2, 3, 4),
                           kernels=("ntk", "sign"), steps=400, batch_size=16, max_length=128, pad_to_multiple_of=16,
                           num_train=4096, num_eval=1024, eval_batch_size=128, n_bootstrap=2000, selection_budget=6)
    raise ValueError(f"study_preset({name!r}): unknown preset; use one of {PRESETS}")


def study_configurations(module_names: Sequence[str], spec) -> dict[str, tuple[str, ...]]:
    """Configuration name → modules for `StudyConfig.configurations` over the candidate `module_names`."""
    names = tuple(module_names)
    if isinstance(spec, Mapping):
        out = {str(k): tuple(v) for k, v in spec.items()}
        unknown = sorted({m for mods in out.values() for m in mods} - set(names))
        if unknown:
            raise ValueError(f"configurations name modules {unknown} that are not candidates; candidates: {names}")
        return out
    out, seen = {}, set()
    for family in spec:
        for name, mods in enumerate_configurations(names, family).items():
            if frozenset(mods) not in seen:
                seen.add(frozenset(mods))
                out[name] = mods
    return out


# ------------------------------------------------------------------------------------------- gated model
def gate_vector(adapted: Adapted, active: Sequence[str]) -> np.ndarray:
    """gate_M: 1.0 for the modules in `active`, 0.0 for the other LoRA modules of `adapted` (its order), for
    `adapted.as_function(gate=gate_M)`."""
    unknown = sorted(set(active) - set(adapted.lora_modules))
    if unknown:
        raise ValueError(f"modules {unknown} carry no LoRA adapter; choose from {adapted.lora_modules}")
    return np.array([float(m in set(active)) for m in adapted.lora_modules])


# ------------------------------------------------------------------------------------------- statistics
def _configuration_statistics(c: StudyConfig, configurations, grams, resid0) -> dict[str, dict[str, float]]:
    """configuration → `kernel_statistics` of K_S for every statistic set of `c.variants`, named with the
    variant's prefix; grams[(kernel, n)] are the module kernels and resid0[n] the residual on n examples."""
    statistics = {name: {} for name in configurations}
    for v in c.variants.values():
        vgrams = grams[v["kernel"], v["num_calibration"]]
        for name, modules in configurations.items():
            stats = kernel_statistics(configuration_kernel(vgrams, modules), resid0[v["num_calibration"]],
                                      kernel=v["kernel"], sigma_absolute=c.sigma_absolute, sigma_trace=c.sigma_trace,
                                      ridge_trace=c.ridge_trace)
            statistics[name].update({v["prefix"] + s: val for s, val in stats.items()})
    return statistics


def _predictor(record, name):
    """A run-level predictor (`PREDICTORS`, a key of the record) or a statistic of K_S (record["statistics"])."""
    return record[name] if name in PREDICTORS else record["statistics"].get(name, math.nan)


def _correlations(records, names, n_bootstrap, groups=None):
    """{predictor: {outcome: `stats.correlation`}}; `groups` (one label per record): a cluster bootstrap."""
    return {s: {o: correlation([_predictor(r, s) for r in records], [r[o] for r in records], groups=groups,
                               n_bootstrap=n_bootstrap) for o in OUTCOMES} for s in names}


def _by_configuration(runs):
    groups = {}
    for r in runs:
        groups.setdefault(r["configuration"], []).append(r)
    return [{"configuration": name, "statistics": {s: float(np.mean([r["statistics"][s] for r in rs]))
                                                   for s in rs[0]["statistics"]},
             **{o: float(np.mean([r[o] for r in rs])) for o in (*PREDICTORS, *OUTCOMES)}}
            for name, rs in groups.items()]


# ------------------------------------------------------------------------------------------------ KRR
def krr_logits(grams_X, cross_EX, modules, f0_EO, resid0_XO, ridge_trace: float) -> tuple[np.ndarray, str]:
    """The kernel regressor of configuration `modules` on eval rows E, without training, and the solve's message:
    f0(E) + K_S(E, X)(K_S(X, X) + λI)⁻¹ r0 with K_S = Σ_{m∈S} K_m, λ = ridge_trace·trace(K_S)/(N·O) (the ridge
    of `kernel_statistics`), r0 = onehot(y) − f0 on X (docs/paper.md §4.2). grams_X: module → (N, N, O, O);
    cross_EX: module → (M, N, O, O); f0_EO (M, O), resid0_XO (N, O). Returns (M, O) float64 logits (all NaN where
    K_S + λI is not positive definite, e.g. a zero kernel)."""
    sol = solve.kernel_ridge(configuration_kernel(grams_X, modules), resid0_XO, ridge_trace, ridge_scale="trace")
    if sol.status != "ok":
        return np.full(np.shape(f0_EO), math.nan), sol.message
    return np.asarray(solve.kernel_predict(configuration_kernel(cross_EX, modules), sol.value, f0_EO),
                      np.float64), sol.message


def krr_outcomes(krr_logits_EO, tuned_logits_EO, labels_E) -> dict[str, float]:
    """krr_eval_accuracy and krr_eval_macro_f1 of the KRR predictor's argmax on labels_E, and krr_agreement: the
    fraction of eval examples where it equals the fine-tuned model's argmax (NaN for non-finite KRR logits)."""
    if not np.all(np.isfinite(krr_logits_EO)):
        return dict.fromkeys(("krr_eval_accuracy", "krr_eval_macro_f1", "krr_agreement"), math.nan)
    krr_E, tuned_E = np.argmax(krr_logits_EO, -1), np.argmax(tuned_logits_EO, -1)
    return {"krr_eval_accuracy": float(np.mean(krr_E == labels_E)),
            "krr_eval_macro_f1": macro_f1(labels_E, krr_E, np.shape(krr_logits_EO)[-1]),
            "krr_agreement": float(np.mean(krr_E == tuned_E))}


# ------------------------------------------------------------------------------------------------ objective
def _study_objective(objective, tokenizer, output_fn):
    """(objective, gated, readout_logits) of what the study trains: ``gated(adapted, gate_M)`` the one function it trains
    for that gate (module i trains iff gate_M[i] = 1), ``readout_logits(found)`` the (N, C) readout logits inside
    the objective's evaluation ``found``, both from the objective's ``study_functions`` (which refuses an objective
    that reads other logits than the study's readout). Default: `ClassificationObjective` of the study's readout."""
    objective = ClassificationObjective(output_fn) if objective is None else objective
    if not callable(getattr(objective, "study_functions", None)):
        raise TypeError(f"run_study(objective={objective!r}): pass None, a ClassificationObjective or a "
                        "NextTokenObjective (jaxlin.next_token.run_objective)")
    return (objective, *objective.study_functions(tokenizer, output_fn))


# ------------------------------------------------------------------------------------------------ study
def run_study(model, train_data: data.TextDataset, eval_data: data.TextDataset, config: StudyConfig, *,
              tokenizer=None, output_fn: Callable | None = None, objective=None, progress: bool = True,
              callback: Callable[[dict], None] | None = None, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int = 100, checkpoint_key: str = "", mesh: Mesh | None = None,
              data_axis: str = "data") -> dict:
    """Run the κ–performance study of `config` on a classification `model`; returns the dict of the module
    docstring. `tokenizer` defaults to `model.tokenizer`; `callback(record)` gets each trained run's record.

    `output_fn`: the readout of every kernel, residual, training run and evaluation (None: the model's head). For
    label words load the model with task="causal_lm" and pass ``tokenizer=readout, output_fn=readout.output_fn``
    (`jaxlin.label_word_readout`): f(θ0) is then the LM's own zero-shot logits and no head is added, so
    `StudyConfig.train_head` is ignored (recorded under variants["train_head"] as False, with the reason).

    `objective`: what each run fine-tunes (docs/decoders.md), `ClassificationObjective(output_fn)` by default (the
    cross-entropy of the readout's C logits); with a label-word readout `NextTokenObjective(readout=readout)`
    (`jaxlin.next_token.run_objective("next_token", readout)`) trains the LM's own next-token loss of each label
    word after its prompt, on the same gated step. Either way the kernels, statistics and KRR predictor are of the
    readout's C logits, eval_accuracy / eval_macro_f1 / krr_agreement are of the readout's argmax (label-word
    accuracy), and final_train_loss / eval_loss are the objective's loss; variants["objective"] records it.

    `checkpoint_dir`, `checkpoint_every`, `checkpoint_key` (docs/scaling.md, "Resuming training"): each training
    run checkpoints its state every `checkpoint_every` steps and at its end in ``<checkpoint_dir>/<seed>-<digest
    of its modules>`` (`jaxlin.train.fit`), so the study called again with the same arguments reads back the runs
    that finished and continues the interrupted one; the kernels are computed again.

    `mesh`, `data_axis` (docs/scaling.md): run on a `jax.sharding.Mesh` with the model's parameters sharded on it
    (`jaxlin.load_pretrained(..., mesh=)`; each seed's LoRA factors follow their base weights): the kernels as
    `module_ntks(mesh=)`, every fit and evaluation as `fit(mesh=)` / `evaluate(mesh=)`, each batch split over
    `data_axis`. With several processes each process passes every example and keeps its share of each batch's
    rows (`jaxlin.distributed.process_rows`), and every process returns the same result. The frozen prefix is
    not used on a mesh. The numbers equal one device's up to float rounding."""
    start = time.perf_counter()
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    want = "classification" if output_fn is None else "causal_lm"
    if model.task != want or tokenizer is None:
        how = ("load_pretrained(..., task='classification')" if output_fn is None else
               "load_pretrained(..., task='causal_lm') for a label-word readout")
        raise ValueError(f"run_study needs a {want} model with a tokenizer (got task={model.task!r}, tokenizer="
                         f"{None if tokenizer is None else type(tokenizer).__name__}); {how} or pass tokenizer=")
    check_readout(tokenizer, output_fn, train_data.num_classes)
    objective, gated, readout_logits = _study_objective(objective, tokenizer, output_fn)
    train_head = config.train_head and output_fn is None
    largest = config.largest_calibration
    for name, have, need in (("num_train", len(train_data), config.num_train), ("num_eval", len(eval_data),
                             config.num_eval), ("num_calibration(_large)", len(train_data), largest)):
        if have < need:
            raise ValueError(f"StudyConfig.{name}={need} exceeds the {have} examples given; lower it or pass more data")
    c = config
    plan = None if mesh is None else MeshPlan(mesh, data_axis)
    evaluate_on_mesh = plan is not None and "mesh" in inspect.signature(objective.evaluate).parameters
    if plan is not None and not evaluate_on_mesh and jax.process_count() > 1:
        raise ValueError(f"the objective {objective.name!r} evaluates on one process only (its evaluate takes no "
                         f"mesh); run this study in one process, or with objective {ClassificationObjective.name!r}")
    fit_kw = {} if plan is None else {"mesh": mesh, "data_axis": data_axis}
    eval_kw = fit_kw if evaluate_on_mesh else {}
    def own(batches, split: bool = plan is not None) -> list[dict]:  # this process's rows of each batch
        return [process_rows(b, fix="the study's batch sizes") if split else b for b in batches]

    adapters = {s: add_lora(model, targets=c.targets, layers=c.layers, rank=c.rank, alpha=c.alpha, seed=s,
                            head=train_head)
                for s in c.seeds}
    if plan is not None:  # LoRA factors on the mesh next to their base weights, once per seed
        adapters = {s: shard_adapted(a, mesh) for s, a in adapters.items()}
    adapted = adapters[c.seeds[0]]  # its apply and frozen serve every seed: seeds differ in A0 values only
    candidates = adapted.lora_modules
    configurations = study_configurations(candidates, c.configurations)
    if c.selection_budget > len(candidates):
        raise ValueError(f"StudyConfig.selection_budget={c.selection_budget} exceeds the {len(candidates)} "
                         f"candidate modules; lower it")
    padding = dict(max_length=c.max_length, pad_to_multiple_of=c.pad_to_multiple_of,
                   padding_side=getattr(tokenizer, "padding_side", "right"))
    train_sub, eval_sub = train_data.subset(np.arange(c.num_train)), eval_data.subset(np.arange(c.num_eval))
    scored_sub = train_sub.subset(np.arange(c.num_train if c.num_train_evaluated is None else c.num_train_evaluated))
    train_config = TrainConfig(learning_rate=c.learning_rate, steps=c.steps, batch_size=c.batch_size,
                               warmup_ratio=c.warmup_ratio, max_length=c.max_length,
                               pad_to_multiple_of=c.pad_to_multiple_of)
    eval_config = dataclasses.replace(train_config, batch_size=c.eval_batch_size)
    step_batches, epoch = [], 0
    while len(step_batches) < c.steps:  # one batch order, shared by every run
        step_batches += list(objective.batches(train_sub, tokenizer, train_config, shuffle=True,
                                               seed=c.data_seed * 100_003 + epoch))
        epoch += 1
    step_batches = own(step_batches[:c.steps])
    eval_batches, train_eval_batches = (own(objective.batches(d, tokenizer, eval_config, shuffle=False, seed=0),
                                            evaluate_on_mesh) for d in (eval_sub, scored_sub))
    optimizer = make_optimizer(train_config, c.steps)  # one object for every run: one compiled step

    # calibration: kernels on the largest set; a smaller set that is its prefix takes the leading block
    calibration = {n: data.calibration_subset(train_data, n, mode=c.calibration_mode, seed=c.data_seed)
                   for n in {v["num_calibration"] for v in c.variants.values()}}
    encoded = {n: data.encode(d, tokenizer, max_length=c.max_length, padding_side=padding["padding_side"])
               for n, d in calibration.items()}
    is_prefix = {n: calibration[n].texts == calibration[largest].texts[:n]
                 and np.array_equal(calibration[n].labels, calibration[largest].labels[:n]) for n in calibration}

    longest = data.round_up(c.max_length, c.pad_to_multiple_of)  # one prefix program for every batch
    frozen_prefixes = {}  # block -> its FrozenPrefix, whose rows a higher block's prefix runs on from
    prefixes = {}  # block -> the training, eval and train-eval batches with that block's input attached

    def shared_prefix(f):
        """(f from its lowest trained block on, that block's FrozenPrefix), or (f, None) where that block is the
        first or the frozen prefix is off. The blocks below hold modules gated off or at B0 = 0, so their hidden
        states are the base model's: the same for f0, the kernel passes, every configuration that starts at that
        block and every seed, so one FrozenPrefix per block serves them all (run on from the rows of the highest
        block below it that has one)."""
        prefix = prefix_of(f, adapted.trainable, length=longest) if c.frozen_prefix and plan is None else None
        if prefix is None:
            return f, None
        if prefix.start_layer not in frozen_prefixes:
            below = max((k for k in frozen_prefixes if k < prefix.start_layer), default=None)
            frozen_prefixes[prefix.start_layer] = prefix_of(f, adapted.trainable, length=longest,
                                                            below=frozen_prefixes.get(below))
        return prefix.function, frozen_prefixes[prefix.start_layer]

    # f0 and the kernels from the candidates' lowest block on, on the rows of that block's prefix: the runs that
    # start there read the same rows, and those above run on from them
    f_all, prefix_all = shared_prefix(adapted.as_function(output_fn, gate=gate_vector(adapted, candidates)))

    def on_prefix(batch):  # the batch as f_all reads it: with its hidden states at f_all's first block
        return batch if prefix_all is None else prefix_all.attach(batch)

    def f0(batches):  # f(θ0) (N, O) of the readout in dataset order; the same for every seed (B0 = 0)
        return evaluate(f_all, adapted.trainable, [on_prefix(b) for b in own(batches)], **fit_kw)["logits"]

    def residual(n):  # r0 = onehot(y) − f0 (N, O) on calibration set n
        f0_NO = f0(data.batches(calibration[n], tokenizer, batch_size=c.eval_batch_size, **padding))
        return np.eye(f0_NO.shape[1])[calibration[n].labels] - f0_NO

    resid0 = {largest: residual(largest)}
    resid0.update({n: resid0[largest][:n] if is_prefix[n] else residual(n) for n in calibration if n != largest})
    timings = dict.fromkeys(("ntk_s", "statistics_s", "train_s", "krr_s", "selection_s", "correlations_s"), 0.0)
    trained, runs, primary_grams = {}, [], None
    # KRR predictor: X = the largest calibration set, E = the eval examples; seed → (K_m(X, X), K_m(E, X))
    t0 = time.perf_counter()
    encoded_eval = data.encode(eval_sub, tokenizer, max_length=c.max_length, padding_side=padding["padding_side"])
    krr_eval_batches = data.batches(eval_sub, tokenizer, batch_size=c.eval_batch_size, **padding)
    f0_eval, labels_eval, krr_kernels = f0(krr_eval_batches), eval_sub.labels, {}
    timings["krr_s"] += time.perf_counter() - t0

    def krr_fields(seed, modules, tuned_logits_EO):
        t0 = time.perf_counter()
        logits_EO, message = krr_logits(*krr_kernels[seed], modules, f0_eval, resid0[largest], c.ridge_trace)
        fields = krr_outcomes(logits_EO, tuned_logits_EO, labels_eval)
        timings["krr_s"] += time.perf_counter() - t0
        return fields if math.isfinite(fields["krr_eval_accuracy"]) else {**fields, "krr_message": message}

    def from_prefix(f):
        """f and its (training, eval, train-eval) batches, from f's lowest trained block on when that is not the
        first (`shared_prefix`)."""
        f, prefix = shared_prefix(f)
        if prefix is None:
            return f, (step_batches, eval_batches, train_eval_batches)
        if prefix.start_layer not in prefixes:
            prefixes[prefix.start_layer] = tuple([prefix.attach(b) for b in bs] for bs in (
                step_batches, eval_batches, train_eval_batches))
        return f, prefixes[prefix.start_layer]

    def checkpoint_kw(seed, modules):  # a directory per trained run, named by what it trains
        digest = hashlib.sha256(json.dumps(sorted(modules)).encode()).hexdigest()[:16]
        return fit_checkpointing(checkpoint_dir, f"{seed}-{digest}", checkpoint_every, checkpoint_key)

    def train_run(seed, modules, label, **extra):
        """The record of `modules` trained with `seed` (trained once per module set), passed to `callback`."""
        key = (seed, frozenset(modules))
        if key not in trained:
            t0 = time.perf_counter()
            f, (steps_b, eval_b, train_eval_b) = from_prefix(gated(adapted, gate_vector(adapted, modules)))
            result = fit(f, adapters[seed].trainable, lambda epoch: steps_b, config=train_config,
                         optimizer=optimizer, loss_fn=objective.loss_fn(f), progress=False, **fit_kw,
                         **checkpoint_kw(seed, modules))
            theta, losses = result.trainable, result.train_loss
            ev, tr = (objective.evaluate(f, theta, b, eval_config, **eval_kw) for b in (eval_b, train_eval_b))
            logits_EC = readout_logits(ev)
            last = losses[-max(1, math.ceil(0.1 * len(losses))):]
            trained[key] = {"final_train_loss": tr["loss"], "train_loss_last10pct": float(np.mean(last)),
                            "train_accuracy": tr["accuracy"], "eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"],
                            "eval_macro_f1": macro_f1(labels_eval, logits_EC.argmax(-1), logits_EC.shape[1]),
                            "train_loss_curve": losses, "prefix_start_layer": getattr(f, "start_layer", 0),
                            "wall_time_s": time.perf_counter() - t0}
            timings["train_s"] += trained[key]["wall_time_s"]
            trained[key].update(krr_fields(seed, modules, logits_EC))
        record = {"configuration": label, "seed": seed, "modules": list(modules), **extra, **trained[key]}
        if callback is not None:
            callback(record)
        return record

    def kernels_of(batch1, batch2=None, **kw):  # seed → {module: K_m}: one pass serves every seed (B0 = 0)
        found = module_ntks(adapted, on_prefix(batch1), None if batch2 is None else on_prefix(batch2), trace_axes=(),
                            modules=candidates, output_fn=output_fn, trainable=[adapters[s].trainable for s in c.seeds],
                            mesh=mesh, start_layer=f_all.start_layer, **kw)
        return dict(zip(c.seeds, found))

    t0 = time.perf_counter()
    grams_by_seed = {s: {} for s in c.seeds}
    for kernel in c.kernels:
        full = kernels_of(encoded[largest], kernel=kernel)
        for n in calibration:
            own_n = None if is_prefix[n] else kernels_of(encoded[n], kernel=kernel)
            for s in c.seeds:
                grams_by_seed[s][kernel, n] = {m: k[:n, :n] for m, k in full[s].items()} if is_prefix[n] else own_n[s]
    timings["ntk_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    cross = kernels_of(encoded_eval, encoded[largest], block_size=largest)  # eval rows in calibration-size blocks
    krr_kernels.update({s: (grams_by_seed[s]["ntk", largest], cross.pop(s)) for s in c.seeds})
    timings["krr_s"] += time.perf_counter() - t0

    bar = tqdm(total=len(configurations) * len(c.seeds), disable=not progress, desc="study", unit="run")
    for seed in c.seeds:
        grams = grams_by_seed[seed]
        t0 = time.perf_counter()
        statistics = _configuration_statistics(c, configurations, grams, resid0)
        if primary_grams is None:
            primary_grams = grams[c.kernels[0], c.num_calibration]
        timings["statistics_s"] += time.perf_counter() - t0
        for name, modules in configurations.items():
            runs.append(train_run(seed, modules, name, statistics=statistics[name]))
            bar.update(1)
            bar.set_postfix(config=name, seed=seed, acc=f"{runs[-1]['eval_accuracy']:.3f}")
        if seed != c.seeds[0]:  # the first seed's kernels stay for the selections
            del krr_kernels[seed], grams_by_seed[seed]
    bar.close()

    t0 = time.perf_counter()
    selection = _selection(c, primary_grams, resid0[c.num_calibration], train_run, progress)
    timings["selection_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = [*runs[0]["statistics"], *PREDICTORS]
    # over runs, the bootstrap resamples whole configurations: a configuration's seeds share its κ (not independent)
    results = _correlations(runs, names, c.n_bootstrap, groups=[r["configuration"] for r in runs])
    by_configuration = _correlations(_by_configuration(runs), names, c.n_bootstrap)
    timings["correlations_s"] = time.perf_counter() - t0
    timings.update(total_s=time.perf_counter() - start, num_trained_runs=len(trained))
    variants = {
        "statistic_sets": c.variants, "primary": next(iter(c.variants)), "candidates": list(candidates),
        "calibration": f"{c.calibration_mode} examples of train_data, max_length {c.max_length}; smaller sets that "
                       "are prefixes of the largest take its leading kernel block",
        "calibration_is_prefix": {str(n): p for n, p in is_prefix.items()},
        "kernel_layout": "full (N, N, O, O) read as the example-major (N·O × N·O) matrix; kappa_traced: the (N × N) "
                         "kernel summed over outputs; sign: singular values of J·s(J)ᵀ",
        "ntk_parameters": "LoRA A and B of the configuration's modules at init; the head is excluded",
        "train_head": train_head,
        "readout": ("the model's classification head" if output_fn is None else
                    f"label-word logits {list(tokenizer.label_words)} (token ids {list(tokenizer.token_ids)}) after "
                    f"the template {tokenizer.template!r}; train_head ignored: no head is added or trained"),
        "sigma": {"absolute": c.sigma_absolute, "trace_relative": c.sigma_trace,
                  "selection": f"sigma_scale={c.sigma_scale!r}: κ_σ and μ_min + σ of the greedy scores at "
                               + (f"σ = {c.sigma_trace}·trace(K)/(N·O) (scale-fair)" if c.sigma_scale == "trace"
                                  else f"σ = {c.sigma_absolute} absolute (the paper's)")},
        "ridge": f"λ = {c.ridge_trace}·trace(K_S)/(N·O); r0 = onehot(y) − f0 on the calibration set (squared loss)",
        "krr_predictor": f"f0(E) + K_S(E, X)(K_S(X, X) + λI)⁻¹ r0, no training: X = the {largest} examples of the "
                         f"largest calibration set, E = the {c.num_eval} eval examples, K_S the summed ntk module "
                         f"kernels of the configuration (full, (N·O × N·O)) at the run's seed, λ = {c.ridge_trace}·"
                         "trace(K_S)/(N·O), readout f0 = the model at θ0 (the study's readout); krr_eval_accuracy "
                         "is correlated like a statistic, krr_agreement = argmax agreement with the fine-tuned model",
        "objective": objective.name,
        "final_train_loss": ("mean cross-entropy" if objective.name == "classification" else "mean next-token "
                             "cross-entropy (over the vocabulary) of the label-word completion tokens, eval_loss "
                             "likewise,") + f" over the first {len(scored_sub)} training examples after training; "
                            "train_loss_last10pct: mean batch loss of the last 10% of steps",
        "training": f"adam, linear schedule, warmup {c.warmup_ratio}, no weight decay, no pull to θ0; "
                    "same batch order for every run; the LoRA seed varies A0 only",
        "selection_training": (f"each selection trained with seed {c.seeds[0]} on the runs' budget" if
                               c.train_selections else "selections chosen, not trained (train_selections=False): "
                               "modules, scores and statistics only"),
    }
    return to_jsonable({"config": dataclasses.asdict(c), "variants": variants, "runs": runs, "results": results,
                        "results_by_configuration": by_configuration, "selection": selection, "timings": timings})


def _selection(c: StudyConfig, grams, resid0_NO, train_run, progress) -> dict:
    """`select.spectral_selection` of `selection_budget` modules on the primary variant's kernels, each method
    given the statistics of its K_S and, with `train_selections`, trained with the first seed."""
    sigma = c.sigma_trace if c.sigma_scale == "trace" else c.sigma_absolute
    selection = spectral_selection(grams, c.selection_budget, resid0_NO, seed=c.seeds[0], sigma=sigma,
                                   sigma_scale=c.sigma_scale, ridge_trace=c.ridge_trace)
    methods = selection["methods"]
    for name, m in tqdm(methods.items(), disable=not progress or not c.train_selections, desc="selection",
                        unit="run"):
        stats = kernel_statistics(configuration_kernel(grams, m["modules"]), resid0_NO,
                                  sigma_absolute=c.sigma_absolute, sigma_trace=c.sigma_trace, ridge_trace=c.ridge_trace)
        methods[name] = (train_run(c.seeds[0], m["modules"], name, scores=m["scores"], statistics=stats)
                         if c.train_selections else {"modules": list(m["modules"]), "scores": m["scores"],
                                                     "statistics": stats})
    return selection


__all__ = ["StudyConfig", "study_preset", "study_configurations", "gate_vector", "krr_logits", "krr_outcomes",
           "kernel_statistics", "run_study", "STATISTICS", "OUTCOMES", "PREDICTORS", "KERNELS", "PRESETS"]
