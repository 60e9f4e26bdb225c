"""The main job, ``jaxlin run``: every stage of the study wired together, with resumable artifacts.

Stages (each a function ``ctx -> (json-able dict, {name: array})``; data between them are plain arrays):

    ntk       per-module LoRA kernels K_m (N, N, O, O) on the calibration set, J Jᵀ and J·sign(J)ᵀ
    spectrum  statistics of every configuration family (single, layer, projection, top-k, all) + greedy scores
    krr       kernel ridge regression with the eNTK of all modules: eval accuracy for every ridge (one eigh)
    dynamics  closed-form linearized GD (squared loss, ridge) vs measured linearized and nonlinear GD
    sweep     nonlinear vs linearized fine-tuning for every λ, their distances and log-log slopes
    probe     the linearity probe (Algorithm 1): L_avg(r), L_upper(r)
    study     the κ–performance correlation over configurations × seeds, and spectral selection vs baselines
    report    results.json, arrays.npz and report.html

A stage's result is stored in ``<out>/stages/<stage>.json`` (+ ``.npz``) with a hash of the config; with
``resume=True`` a stored stage whose hash matches is read back instead of recomputed.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .config import STAGES, RunConfig

ORDER = STAGES


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Context:
    """What the stages share: the model, the data and the finished stages' results."""

    config: RunConfig
    out: Path
    model: object = None
    adapted: object = None  # LoRA (+ head if config.train_head)
    adapted_lora: object = None  # LoRA only: the parameters of the kernels
    train: object = None
    eval: object = None
    calibration: object = None
    results: dict = dataclasses.field(default_factory=dict)
    arrays: dict = dataclasses.field(default_factory=dict)

    length: int = 0  # every kernel batch is padded to this many tokens, so all kernel tiles share one compile

    def batch(self, dataset):
        from .data import pad_batch

        tok = self.model.tokenizer
        ids = tok.encode_unpadded(list(dataset.texts), self.config.max_length)
        out = pad_batch(ids, pad_token_id=tok.pad_token_id, length=self.length, padding_side=tok.padding_side)
        out["labels"] = np.asarray(dataset.labels, np.int32)
        return out


def default_out_dir(config: RunConfig, resume: bool = False) -> Path:
    root = Path("jaxlin-out")
    if resume:
        previous = sorted(root.glob(f"{config.preset}-*"))
        if previous:
            return previous[-1]
    return root / f"{config.preset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def environment() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    from . import __version__
    from .backend import check_backend

    return {"jaxlin": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "x64": bool(jax.config.jax_enable_x64),
            "backend_check": check_backend().to_dict()}


def setup(config: RunConfig, out: Path) -> Context:
    """Load the model and the data, choose the calibration set and put LoRA on the targets."""
    from . import data
    from .adapters import LoRA, adapt
    from .data import DataError
    from .models import load_pretrained

    ctx = Context(config, out)
    ds = load_data(config)
    need = config.num_calibration + 2
    if len(ds) < need or ds.num_classes < 2:
        raise DataError(f"{config.dataset} has {len(ds)} examples in {ds.num_classes} class(es); jaxlin run needs "
                        f"at least {need} examples (num_calibration={config.num_calibration} + 2 to evaluate) and "
                        "two classes; add data or lower --num-calibration")
    n_eval = max(1, min(config.num_eval, len(ds) // 5))
    train, ctx.eval = data.train_eval_split(ds, eval_size=n_eval, seed=config.seed)
    if len(train) < config.num_train:
        log(f"note: {config.dataset} has {len(train)} training examples after the split; using all of them")
    ctx.train = train.subset(np.arange(min(config.num_train, len(train))))
    ctx.calibration = data.calibration_subset(ctx.train, config.num_calibration, mode=config.calibration_mode,
                                              seed=config.seed)
    head = config.head if _is_encoder(config.model) else None
    ctx.model = load_pretrained(config.model, task="classification", num_labels=ds.num_classes, seed=config.seed,
                                head=head)
    if ctx.model.tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer; jaxlin run needs one to encode {config.dataset}")
    lora = LoRA(tuple(config.targets), config.layers, config.rank, config.alpha, config.lora_init, config.seed)
    ctx.adapted = adapt(ctx.model, lora=lora, head=config.train_head)
    ctx.adapted_lora = adapt(ctx.model, lora=lora)
    longest = max(len(t) for ds in (ctx.train, ctx.eval)
                  for t in ctx.model.tokenizer.encode_unpadded(list(ds.texts), config.max_length))
    ctx.length = -(-longest // 8) * 8
    return ctx


def _block_size(ctx: Context) -> int:
    """One tile shape for every kernel of the run (calibration, KRR, cross): the calibration set's size."""
    return ctx.config.block_size or ctx.config.num_calibration


def _is_encoder(source: str) -> bool:
    return not any(k in str(source).lower() for k in ("smollm", "llama", "gpt", "qwen", "mistral", ".gguf"))


def load_data(config: RunConfig):
    from . import data

    if config.dataset.startswith("glue/"):
        from .hub_data import load_glue

        return load_glue(config.dataset.split("/", 1)[1])
    return data.load_dataset(config.dataset, text_column=config.text_column, label_column=config.label_column,
                             label_names=config.label_names)


# -------------------------------------------------------------------------------------------------- stages

def stage_ntk(ctx: Context):
    from .module_ntk import module_ntks

    cfg = ctx.config
    cal = ctx.batch(ctx.calibration)
    modules = ctx.adapted_lora.lora_modules
    kw = dict(trace_axes=(), implementation=cfg.kernel_implementation, block_size=_block_size(ctx), progress=True)
    t = time.perf_counter()
    grams = module_ntks(ctx.adapted_lora, cal, **kw)
    seconds = time.perf_counter() - t
    arrays = {f"gram/{m}": k for m, k in grams.items()}
    if cfg.sign_kernel:
        arrays.update({f"gram_sign/{m}": k for m, k in module_ntks(ctx.adapted_lora, cal, kernel="sign",
                                                                   **kw).items()})
    shape = next(iter(grams.values())).shape
    return {"modules": list(modules), "shape": list(shape), "implementation": cfg.kernel_implementation,
            "seconds_ntk": seconds, "max_length": int(cal["input_ids"].shape[1]),
            "real_lengths": cal["attention_mask"].sum(1).tolist()}, arrays


def module_grams(ctx: Context, sign: bool = False) -> dict:
    prefix = "gram_sign/" if sign else "gram/"
    return {k[len(prefix):]: v for k, v in ctx.arrays.items() if k.startswith(prefix)}


def stage_spectrum(ctx: Context):
    from . import select, spectrum

    cfg = ctx.config
    grams = module_grams(ctx)
    signs = module_grams(ctx, sign=True)
    names = list(grams)
    configs = {}
    for family in ("single", "layer", "projection", "top_k", "all"):
        for name, mods in select.enumerate_configurations(names, family).items():
            configs.setdefault(name, (family, mods))
    out, arrays = {}, {}
    for name, (family, mods) in configs.items():
        k = select.configuration_kernel(grams, mods)
        stats = spectrum.spectrum_stats(k, sigma=cfg.sigma_absolute)
        entry = {"modules": list(mods), "family": family, "stats": stats,
                 "kappa_sigma": spectrum.condition_numbers(k, cfg.sigmas, sigma_scale="trace"),
                 "traced": {"condition_number": spectrum.spectrum_stats(np.einsum("ijaa->ij", k))["condition_number"]}}
        if signs:
            entry["sign_stats"] = spectrum.sign_kernel_stats(select.configuration_kernel(signs, mods))
        out[name] = entry
        arrays[f"eig/{name}"] = stats["eigenvalues"]
    resid0 = _calibration_residual(ctx)
    flat = {m: spectrum.as_matrix(k) for m, k in grams.items()}
    ridge = 1e-4 * np.trace(sum(flat.values())) / resid0.size
    greedy = {}
    for score in ("kappa", "mu_min", "ridge_objective"):
        greedy[f"greedy_{score}"] = select.greedy_select(flat, cfg.selection_budget, score=score,
                                                         sigma=cfg.sigma_absolute, ridge=ridge, resid0=resid0)
    baselines = select.baseline_selections(names, cfg.selection_budget, seed=cfg.seed, module_grams=flat,
                                           sigma=cfg.sigma_absolute)
    return spectrum.to_jsonable({"configurations": out, "selection_scores": {**greedy, **baselines},
                                 "ridge_objective_ridge": ridge}), arrays


def _onehot(ctx: Context, labels) -> np.ndarray:
    return np.eye(ctx.train.num_classes)[np.asarray(labels)]


def _outputs(ctx: Context, batch):
    """Logits at θ0 (LoRA B = 0, so those of the base model with its head), float64 on the host."""
    import jax

    ad = ctx.adapted_lora
    return np.asarray(jax.jit(ad.apply)(ad.trainable, ad.frozen, batch["input_ids"], batch["attention_mask"]),
                      np.float64)


def _calibration_residual(ctx: Context) -> np.ndarray:
    """r0 = onehot(y) − f(θ0) on the calibration set, flattened example-major to (N·C,)."""
    y = _onehot(ctx, ctx.calibration.labels)
    return (y - _outputs(ctx, ctx.batch(ctx.calibration))).reshape(-1)


def stage_krr(ctx: Context):
    from .module_ntk import module_ntks
    from .solve import ridge_path

    cfg = ctx.config
    krr_set = ctx.train.subset(np.arange(min(cfg.num_krr, len(ctx.train))))
    krr_eval = ctx.eval.subset(np.arange(min(cfg.num_krr, len(ctx.eval))))  # the cross kernel costs M·N
    xb, eb = ctx.batch(krr_set), ctx.batch(krr_eval)
    kw = dict(trace_axes=(), implementation=cfg.kernel_implementation, block_size=_block_size(ctx), progress=True)
    k_train = sum(module_ntks(ctx.adapted_lora, xb, **kw).values())
    k_cross = sum(module_ntks(ctx.adapted_lora, eb, xb, **kw).values())
    f0_train, f0_eval = _outputs(ctx, xb), _outputs(ctx, eb)
    y = _onehot(ctx, krr_set.labels)
    path = ridge_path(k_train, y - f0_train, np.asarray(cfg.krr_ridges), ridge_scale="trace")
    pred_eval = np.asarray(path.predict(k_cross, f0_eval))  # (K, M, O)
    pred_train = np.asarray(path.train_predictions(f0_train))
    acc = lambda p, labels: [float(np.mean(np.argmax(q, -1) == labels)) for q in p]  # noqa: E731
    return {"configuration": "all", "num_train": len(krr_set), "ridges": list(cfg.krr_ridges),
            "ridge_scale": "trace", "ridges_absolute": np.asarray(path.ridges).tolist(),
            "num_eval": len(krr_eval), "eval_accuracy": acc(pred_eval, krr_eval.labels),
            "train_accuracy": acc(pred_train, krr_set.labels),
            "objective": np.asarray(path.objective).tolist(),
            "eval_accuracy_at_init": float(np.mean(np.argmax(f0_eval, -1) == krr_eval.labels)),
            "targets": "one-hot, residual Y - f0"}, {"krr/k_train": k_train}


def stage_dynamics(ctx: Context):
    """Full-batch GD with squared loss on the calibration set, LoRA parameters only (those of the kernel)."""
    from . import data
    from .solve import gd_dynamics
    from .spectrum import as_matrix
    from .train import TrainConfig, fit, model_functions

    cfg = ctx.config
    n = len(ctx.calibration)
    k = as_matrix(sum(module_grams(ctx).values()))
    resid0 = _calibration_residual(ctx)
    ridge_sum = cfg.dynamics_ridge * np.trace(k) / k.shape[0]  # ridge of the summed objective ½Σ‖r‖² + ½λΣ‖δ‖²
    mu_max = float(np.linalg.eigvalsh(k)[-1])
    lr_sum = 1.0 / (mu_max + ridge_sum)
    # the trainer minimises the mean over n examples: lr_mean = n·lr_sum and λ_mean = λ_sum / n give the same path
    steps = cfg.dynamics_steps
    predicted = gd_dynamics(k, resid0, ridge_sum, lr_sum, np.arange(steps))
    tc = TrainConfig(learning_rate=n * lr_sum, steps=steps, batch_size=n, warmup_ratio=0.0, schedule="constant",
                     optimizer="sgd", loss="squared", regularizer="prox" if ridge_sum > 0 else "none",
                     strength=ridge_sum / n, anchor="init", seed=cfg.seed, max_length=cfg.max_length,
                     pad_to_multiple_of=ctx.length)
    batches = lambda epoch: data.batches(ctx.calibration, ctx.model.tokenizer, batch_size=n,  # noqa: E731
                                         max_length=cfg.max_length, pad_to_multiple_of=ctx.length)
    nonlinear, linearized = model_functions(ctx.adapted_lora)
    measured = {name: fit(fn, ctx.adapted_lora.trainable, batches, config=tc, progress=False).train_loss
                for name, fn in (("linearized", linearized), ("nonlinear", nonlinear))}
    return {"steps": list(range(steps)), "learning_rate": n * lr_sum, "learning_rate_summed": lr_sum,
            "ridge": ridge_sum / n, "ridge_summed": ridge_sum, "ridge_relative": cfg.dynamics_ridge,
            "predicted_loss": (np.asarray(predicted.loss) / n).tolist(),
            "measured_loss_linearized": measured["linearized"], "measured_loss_nonlinear": measured["nonlinear"],
            "loss": "mean over examples of ½‖f − onehot(y)‖²"}, {}


def stage_sweep(ctx: Context):
    from .sweep import lambda_sweep, sweep_summary
    from .train import TrainConfig

    cfg = ctx.config
    tc = TrainConfig(learning_rate=cfg.learning_rate, steps=cfg.sweep_steps, batch_size=cfg.batch_size,
                     loss=cfg.loss, anchor=cfg.anchor, seed=cfg.seed, max_length=cfg.max_length,
                     pad_to_multiple_of=ctx.length)
    results = lambda_sweep(ctx.adapted, ctx.train, ctx.eval, ctx.model.tokenizer, lambdas=list(cfg.lambdas),
                           config=tc, regularizer=cfg.regularizer, progress=True,
                           num_train_evaluated=min(cfg.sweep_num_train_evaluated, len(ctx.train)))
    for r in results:  # the schema's headline output distance is the eval one; no radius at λ = 0
        r["output_distance_lin_nonlin"] = r["output_distance_lin_nonlin_eval"]
        if r["theorem2_radius"] is None:
            r["theorem2_radius"] = float("nan")
    summary = sweep_summary(results)
    return {"sweep": results, "sweep_summary": {**summary["slopes"],
                                                "theorem2_radius": summary["theorem2_radius_slope"]}}, {}


def stage_probe(ctx: Context):
    from .probe import probe_adapted

    cfg = ctx.config
    return probe_adapted(ctx.adapted_lora, ctx.batch(ctx.calibration), radii=list(cfg.probe_radii),
                         num_directions=cfg.probe_directions, num_tangents=cfg.probe_tangents, seed=cfg.seed), {}


def stage_study(ctx: Context):
    from . import study

    cfg = ctx.config
    chosen = {k: v for k, v in (("configurations", cfg.study_configurations), ("seeds", cfg.study_seeds))
              if v is not None}
    scfg = dataclasses.replace(study.study_preset(cfg.study), targets=tuple(cfg.targets), layers=cfg.layers,
                               rank=cfg.rank,
                               alpha=cfg.alpha, selection_budget=cfg.selection_budget, train_head=cfg.train_head,
                               data_seed=cfg.seed, **chosen)
    return study.run_study(ctx.model, ctx.train, ctx.eval, scfg, progress=True), {}


STAGE_FUNCTIONS: dict[str, Callable] = {"ntk": stage_ntk, "spectrum": stage_spectrum, "krr": stage_krr,
                                        "dynamics": stage_dynamics, "sweep": stage_sweep, "probe": stage_probe,
                                        "study": stage_study}
NEEDS = {"spectrum": ("ntk",), "dynamics": ("ntk",)}


# --------------------------------------------------------------------------------------------------- runner

def run(config: RunConfig, out: Path | None = None, *, resume: bool = False) -> Path:
    """Run the configured stages; write ``results.json``, ``arrays.npz`` and ``report.html`` to ``out``."""
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 Gram accumulation and eigensolves
    from .backend import require_healthy_backend

    require_healthy_backend()  # before anything is computed or written: a miscompiling jaxlib stops the run here
    out = Path(out) if out is not None else default_out_dir(config, resume)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    log(f"jaxlin run: preset {config.preset}, output {out}")
    ctx = setup(config, out)
    timings["setup"] = time.perf_counter() - t
    wanted = [s for s in ORDER if s in config.stages and s != "report"]
    for dep in [d for s in wanted for d in NEEDS.get(s, ())]:
        if dep not in wanted:
            wanted.insert(0, dep)
    for i, stage in enumerate([s for s in ORDER if s in wanted], 1):
        t = time.perf_counter()
        result, arrays, reused = _run_stage(ctx, stage, resume)
        ctx.results[stage], timings[stage] = result, time.perf_counter() - t
        ctx.arrays.update(arrays)
        log(f"[{i}/{len(wanted)}] {stage}: {'reused' if reused else 'done'} in {timings[stage]:.1f} s")
    results = assemble(ctx, timings)
    write_results(out, results, ctx.arrays)
    if "report" in config.stages:
        from .report import render_report

        t = time.perf_counter()
        render_report(out)
        results["timings"]["report"] = time.perf_counter() - t
        (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    return out


def _run_stage(ctx: Context, stage: str, resume: bool):
    path = ctx.out / "stages" / f"{stage}.json"
    digest = ctx.config.stage_hash(stage)
    if resume and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("hash") == digest:
            npz = path.with_suffix(".npz")
            arrays = dict(np.load(npz)) if npz.exists() else {}
            return stored["result"], arrays, True
    result, arrays = STAGE_FUNCTIONS[stage](ctx)
    from .spectrum import to_jsonable

    result = to_jsonable(result)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"hash": digest, "result": result}, allow_nan=False))
    if arrays:
        np.savez(path.with_suffix(".npz"), **arrays)
    tmp.replace(path)
    return result, arrays, False


def assemble(ctx: Context, timings: dict) -> dict:
    """The results.json document (``docs/results-schema.md``)."""
    from . import __version__
    from .schema import SCHEMA_VERSION

    cfg, r = ctx.config, ctx.results
    skipped = {"skipped": "stage not run (see config.stages)"}
    spectrum = r.get("spectrum", {}).get("configurations", skipped)
    study = r.get("study")
    selection = skipped
    if study and "selection" in study:
        selection = study["selection"]
    elif "spectrum" in r:
        selection = {"budget": cfg.selection_budget,
                     "methods": {k: _selection_entry(v) for k, v in r["spectrum"]["selection_scores"].items()}}
    return {
        "schema": SCHEMA_VERSION, "jaxlin_version": __version__, "config": cfg.to_dict(),
        "environment": environment(), "timings": timings,
        "variants": {
            "kernel": "empirical NTK J Jᵀ of the LoRA parameters (head excluded, as in the paper's code), "
                      "full (N·C)×(N·C) blocks, example-major",
            "sign_kernel": "J·s(J)ᵀ, s(z)=z/(|z|+1e-8) (the published code's kernel), singular values",
            "spectrum_sigma": f"condition_number at σ={cfg.sigma_absolute} absolute; kappa_sigma at σ·trace/n",
            "calibration": f"{cfg.calibration_mode} {cfg.num_calibration} of the seeded, shuffled training split",
            "inputs": "token ids through the full model, real lengths, padding to a multiple of 8, proper mask",
            "regularizer": cfg.regularizer, "anchor": cfg.anchor, "loss": cfg.loss,
            "head": cfg.head, "lora_init": cfg.lora_init, "krr_targets": "one-hot, residual Y − f0",
        },
        "data": {"dataset": cfg.dataset, "num_train": len(ctx.train), "num_eval": len(ctx.eval),
                 "num_calibration": len(ctx.calibration), "label_names": list(ctx.train.label_names)},
        "model": {"source": str(cfg.model), "family": ctx.model.family, "num_layers": ctx.model.num_layers,
                  "modules": list(ctx.adapted.modules), "num_trainable_params": ctx.adapted.num_params()},
        "spectrum": spectrum,
        "krr": r.get("krr", skipped),
        "dynamics": r.get("dynamics", skipped),
        "sweep": r.get("sweep", {}).get("sweep", []),
        "sweep_summary": r.get("sweep", {}).get("sweep_summary", {}),
        "probe": r.get("probe", skipped),
        "correlation": {"runs": study["runs"], "results": study["results"]} if study else skipped,
        "selection": selection,
        "arrays": "arrays.npz",
    }


def _selection_entry(v) -> dict:
    if isinstance(v, dict):  # greedy_select: {"selected", "scores", ...}
        return {"modules": list(v["selected"]), "scores": list(v["scores"])}
    return {"modules": list(v)}  # a baseline: the modules


def write_results(out: Path, results: dict, arrays: dict) -> None:
    from .schema import validate_results

    validate_results(results)
    np.savez(out / "arrays.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
