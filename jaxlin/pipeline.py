"""The main job, ``jaxlin run``: every stage of the study wired together, with resumable artifacts.

Stages (each a function ``ctx -> (json-able dict, {name: array})``; data between them are plain arrays):

    ntk       per-module LoRA kernels K_m (N, N, O, O) on the calibration set, J Jᵀ and J·sign(J)ᵀ
    spectrum  kernel_statistics of every configuration family (single, layer, projection, top-k, all) and the
              spectral selection (results.json `selection`, trace-relative σ)
    krr       kernel ridge regression with the eNTK of all modules: eval accuracy for every ridge (one eigh)
    dynamics  closed-form linearized GD (squared loss, ridge) vs measured linearized and nonlinear GD
    sweep     nonlinear vs linearized fine-tuning for every λ, their distances and log-log slopes
    probe     the linearity probe (Algorithm 1): L_avg(r), L_upper(r)
    study     the κ–performance correlation over configurations × seeds, and spectral selection vs baselines
    report    results.json, arrays.npz and report.html

A stage's result is stored in ``<out>/stages/<stage>.json`` (+ ``.npz``) under a key that hashes everything
it read: the config, the loaded dataset, the checkpoint's files and the jaxlin version. With ``resume=True`` a
stored stage with the same key is read back instead of recomputed; a changed input or a damaged file is
recomputed, and the log says why. A stage holding NaN/inf outside `NONFINITE_ALLOWED` is never stored.
The run holds a lock on its output directory and writes every file through a temp file and an atomic
rename (`output_directory`, `atomic_write`); docs/refusals.md lists what a run refuses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from .config import STAGES, ConfigError, RunConfig
from .models.base import max_input_length
from .schema import SCHEMA_VERSION

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
    inputs: dict = dataclasses.field(default_factory=dict)  # fingerprints of what the stages read (setup)
    stages: dict = dataclasses.field(default_factory=dict)  # per finished stage: key, reused, seconds, finished

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
    """Load the model and the data, check them against each other, choose the calibration set, put LoRA on the
    targets and fingerprint every input (``ctx.inputs``)."""
    from . import __version__, data
    from .data import DataError
    from .models import family_kind, load_pretrained
    from .models.checkpoint import CheckpointError

    ctx = Context(config, out)
    ds = load_data(config)
    need = config.num_calibration + 2
    if len(ds) < need or ds.num_classes < 2:
        raise DataError(f"{config.dataset} has {len(ds)} examples in {ds.num_classes} class(es); jaxlin run needs "
                        f"at least {need} examples (num_calibration={config.num_calibration} + 2 to evaluate) and "
                        "two classes; add data or lower --num-calibration")
    # eval takes at most a fifth, and always leaves num_calibration examples to train on
    n_eval = max(1, min(config.num_eval, len(ds) // 5, len(ds) - config.num_calibration))
    train, ctx.eval = data.train_eval_split(ds, eval_size=n_eval, seed=config.seed)
    if len(train) < config.num_train:
        log(f"note: {config.dataset} has {len(train)} training examples after the split; using all of them")
    ctx.train = train.subset(np.arange(min(config.num_train, len(train))))
    ctx.calibration = data.calibration_subset(ctx.train, config.num_calibration, mode=config.calibration_mode,
                                              seed=config.seed)
    head = config.head if family_kind(config.model) == "encoder" else None  # decoders have one head, `score`
    ctx.model = load_pretrained(config.model, task="classification", num_labels=ds.num_classes, seed=config.seed,
                                head=head)
    if ctx.model.tokenizer is None:
        raise CheckpointError(f"{config.model} has no tokenizer; jaxlin run needs one to encode {config.dataset}: "
                              "put tokenizer.json (or vocab files) next to the weights")
    limit = max_input_length(ctx.model.config)
    if limit is not None and config.max_length > limit:
        raise ConfigError(f"max_length={config.max_length} is longer than the {limit} positions {config.model} "
                          f"embeds; tokens past {limit} would read undefined position embeddings: pass "
                          f"--max-length {limit} or less")
    ctx.adapted, ctx.adapted_lora = _adapt(ctx.model, config)
    longest = max(len(t) for ds in (ctx.train, ctx.eval)
                  for t in ctx.model.tokenizer.encode_unpadded(list(ds.texts), config.max_length))
    ctx.length = min(-(-longest // 8) * 8, limit or math.inf)  # padded positions must exist too
    ctx.inputs = {"config": config.fingerprint(), "dataset": dataset_digest(ds),
                  "checkpoint": checkpoint_digest(config.model), "jaxlin": __version__, "format": SCHEMA_VERSION}
    return ctx


def _adapt(model, config: RunConfig):
    """(LoRA + head if config.train_head, LoRA only) on config.targets in config.layers of `model`."""
    from .adapters import LoRA, adapt

    lora = LoRA(tuple(config.targets), config.layers, config.rank, config.alpha, config.lora_init, config.seed)
    try:
        return adapt(model, lora=lora, head=config.train_head), adapt(model, lora=lora)
    except ConfigError:  # already names its flag
        raise
    except ValueError as e:  # adapters' checks of the layers and targets against this model's modules
        raise ConfigError(f"{e}; fix --layers or --targets") from None


def _block_size(ctx: Context) -> int:
    """One tile shape for every kernel of the run (calibration, KRR, cross): the calibration set's size."""
    return ctx.config.block_size or ctx.config.num_calibration


def load_data(config: RunConfig):
    from . import data

    if config.dataset.startswith("glue/"):
        from .hub_data import load_glue

        custom = [f for f in ("label_names", "missing_labels", "encoding", "skip_empty")
                  if getattr(config, f) != getattr(RunConfig, f)]
        if custom:
            raise ConfigError(f"{', '.join(custom)} apply to user files, not to {config.dataset}; drop "
                              + ", ".join("--" + f.replace("_", "-") for f in custom))
        return load_glue(config.dataset.split("/", 1)[1])
    return data.load_dataset(config.dataset, text_column=config.text_column, label_column=config.label_column,
                             label_names=config.label_names, missing_labels=config.missing_labels,
                             encoding=config.encoding, skip_empty=config.skip_empty)


# ------------------------------------------------------------------------------------------- input identity

BIG_FILE_BYTES = 4 * 2**30  # a checkpoint file larger than this is identified by its size, mtime and first bytes
HEAD_BYTES = 64 * 2**20  # how many first bytes of such a file are hashed (its header and metadata)


def dataset_digest(ds) -> str:
    """SHA-256 of a loaded data set: its label names, every text and every label, in order."""
    h = hashlib.sha256(json.dumps(list(ds.label_names)).encode())
    for text in ds.texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    h.update(np.asarray(ds.labels, np.int64).tobytes())
    return h.hexdigest()


def checkpoint_digest(source: str) -> str:
    """SHA-256 over the names and contents of the checkpoint's files (a .gguf file, or every file at the top of
    its directory); files over BIG_FILE_BYTES contribute size, mtime and their first HEAD_BYTES instead."""
    from .models.checkpoint import resolve

    path = resolve(source).path
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file.name}\0{_file_digest(file)}\0".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size > BIG_FILE_BYTES:
            h.update(f.read(HEAD_BYTES))
            return f"{h.hexdigest()}:{st.st_size}:{st.st_mtime_ns}"
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """`spectrum.kernel_statistics` of every configuration family (single, layer, projection, top-k, all), the
    κ_σ grid over config.sigmas (× trace/n) and `select.spectral_selection` (the selection of results.json)."""
    from . import select, spectrum

    cfg = ctx.config
    grams = module_grams(ctx)
    signs = module_grams(ctx, sign=True)
    resid0 = _calibration_residual(ctx)
    configs = {}
    for family in select.FAMILIES:
        for name, mods in select.enumerate_configurations(list(grams), family).items():
            configs.setdefault(name, (family, mods))
    statistics = dict(sigma_absolute=cfg.sigma_absolute, sigma_trace=spectrum.DEFAULT_SIGMA_TRACE)
    out, arrays = {}, {}
    for name, (family, mods) in configs.items():
        k = select.configuration_kernel(grams, mods)
        eigenvalues = spectrum.spectrum_stats(k)["eigenvalues"]
        entry = {"modules": list(mods), "family": family,
                 "stats": {"eigenvalues": eigenvalues, **spectrum.kernel_statistics(k, resid0, **statistics)},
                 "kappa_sigma": spectrum.condition_numbers(k, cfg.sigmas, sigma_scale="trace")}
        if signs:
            k_sign = select.configuration_kernel(signs, mods)
            entry["sign_stats"] = {"singular_values": spectrum.sign_kernel_stats(k_sign)["singular_values"],
                                   **spectrum.kernel_statistics(k_sign, kernel="sign", **statistics)}
        out[name] = entry
        arrays[f"eig/{name}"] = eigenvalues
    selection = select.spectral_selection(grams, cfg.selection_budget, resid0, seed=cfg.seed)
    return {"configurations": out, "selection": selection}, arrays


def _onehot(ctx: Context, labels) -> np.ndarray:
    return np.eye(ctx.train.num_classes)[np.asarray(labels)]


def _outputs(ctx: Context, batch):
    """Logits at θ0 (LoRA B = 0, so those of the base model with its head), float64 on the host."""
    import jax

    from .adapters import AdaptedFunction

    ad = ctx.adapted_lora  # the function is an argument of the jit, so its frozen weights are inputs
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return np.asarray(jax.jit(AdaptedFunction.__call__)(ad.as_function(), ad.trainable, x), np.float64)


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
    """Run the configured stages; write ``results.json``, ``arrays.npz`` and ``report.html`` to ``out``, which
    the run holds locked (`output_directory`) until it ends."""
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 Gram accumulation and eigensolves
    from .backend import require_healthy_backend

    require_healthy_backend()  # before anything is computed or written: a miscompiling jaxlib stops the run here
    out = Path(out) if out is not None else default_out_dir(config, resume)
    with output_directory(out):
        log(f"jaxlin run: preset {config.preset}, output {out}")
        t = time.perf_counter()
        ctx = setup(config, out)
        timings = {"setup": time.perf_counter() - t}
        wanted = [s for s in ORDER if s in config.stages and s != "report"]
        for dep in [d for s in wanted for d in NEEDS.get(s, ())]:
            if dep not in wanted:
                wanted.insert(0, dep)
        for i, stage in enumerate([s for s in ORDER if s in wanted], 1):
            result, arrays, record = _run_stage(ctx, stage, resume)
            ctx.results[stage], ctx.stages[stage], timings[stage] = result, record, record["seconds"]
            ctx.arrays.update(arrays)
            seconds = record["seconds"]
            log(f"[{i}/{len(wanted)}] {stage}: "
                + (f"reused (computed in {seconds:.1f} s)" if record["reused"] else f"done in {seconds:.1f} s"))
        results = assemble(ctx, timings)
        write_results(out, results, ctx.arrays)
        if "report" in config.stages:
            from .report import render_report

            t = time.perf_counter()
            render_report(out)
            results["timings"]["report"] = time.perf_counter() - t
            write_results(out, results)
    return out


# A stored stage: stages/<stage>.json {"stage", "key", "inputs", "seconds", "finished", "arrays", "result"} and,
# when it has arrays, stages/<stage>.npz. The npz is written first and the json last, so a json that parses
# marks a finished stage; `key` hashes the stage name and `inputs` (config, dataset, checkpoint, jaxlin version).

STORED_KEYS = {"stage", "key", "inputs", "seconds", "finished", "arrays", "result"}


def stage_key(stage: str, inputs: dict) -> str:
    return hashlib.sha256(json.dumps([stage, inputs], sort_keys=True).encode()).hexdigest()[:16]


def _run_stage(ctx: Context, stage: str, resume: bool) -> tuple[dict, dict, dict]:
    """The stage's result, arrays and record ({key, reused, seconds, finished}): read back when ``resume``
    finds it stored with the same key, else computed, checked for non-finite numbers and stored."""
    path = ctx.out / "stages" / f"{stage}.json"
    key = stage_key(stage, ctx.inputs)
    if resume and path.exists():
        stored, arrays, why = _read_stage(path, key, ctx.inputs)
        if stored is not None:
            return stored["result"], arrays, _record(stored, reused=True)
        log(f"{stage}: recomputing: {why}")
    t = time.perf_counter()
    result, arrays = STAGE_FUNCTIONS[stage](ctx)
    seconds = time.perf_counter() - t
    from ._util import to_jsonable

    result = to_jsonable(result)
    check_finite(stage, result, arrays, ctx.config)
    stored = {"stage": stage, "key": key, "inputs": ctx.inputs, "seconds": seconds,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "arrays": sorted(arrays), "result": result}
    _write_stage(path, stored, arrays)
    return result, arrays, _record(stored, reused=False)


def _record(stored: dict, reused: bool) -> dict:
    return {"key": stored["key"], "reused": reused, "seconds": stored["seconds"], "finished": stored["finished"]}


def _read_stage(path: Path, key: str, inputs: dict) -> tuple[dict | None, dict, str]:
    """(stored stage, its arrays, "") when `path` holds this key's finished stage, else (None, {}, why not)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, {}, f"{path} is unreadable ({type(e).__name__}), e.g. cut short by a kill"
    if not isinstance(stored, dict) or not STORED_KEYS <= set(stored):
        return None, {}, f"{path} lacks the input keys of this jaxlin (written by an older one, or damaged)"
    if stored.get("key") != key:
        old = stored["inputs"] if isinstance(stored["inputs"], dict) else {}
        changed = [name for name in ("dataset", "checkpoint", "config", "jaxlin", "format")
                   if old.get(name) != inputs[name]]
        what = {"dataset": "the dataset changed", "checkpoint": "the checkpoint changed",
                "config": "the config changed",
                "jaxlin": f"jaxlin changed ({old.get('jaxlin')} → {inputs['jaxlin']})",
                "format": f"the results format changed ({old.get('format')} → {inputs['format']})"}
        return None, {}, (", ".join(what[c] for c in changed) or "its key differs") + " since the stored stage"
    if not stored["arrays"]:
        return stored, {}, ""
    npz = path.with_suffix(".npz")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        return None, {}, f"{npz} is missing or unreadable ({type(e).__name__}), e.g. cut short by a kill"
    if sorted(arrays) != stored["arrays"]:
        return None, {}, f"{npz} does not hold the arrays {path.name} lists"
    return stored, arrays, ""


def _write_stage(path: Path, stored: dict, arrays: dict) -> None:
    try:
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)  # the stage is unfinished until its json is back
    except OSError as e:
        raise RunError(_os_message(path.parent, e)) from None
    if arrays:
        atomic_write(path.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    atomic_write(path, lambda f: f.write(json.dumps(stored, allow_nan=False).encode()))


# Where a stage may hold a non-finite number, and which one; every other number of a stage must be finite.
# Patterns match the dotted path of a value (dict keys and list indices joined by ".").
NONFINITE_ALLOWED = {
    "spectrum": (("configurations.*kappa*", "inf"), ("selection.methods.*.scores.*", "inf")),  # a singular kernel
    "sweep": (("sweep.*.theorem2_radius", "nan"),  # no radius at λ = 0
              ("sweep_summary.*", "nan"),  # a slope needs two usable λ
              ("sweep.*.relative_module_distances.*", "inf")),  # a module whose initial weights are zero
    "study": (("runs.*.statistics.*kappa*", "inf"), ("selection.methods.*.statistics.*kappa*", "inf"),
              ("selection.methods.*.scores.*", "inf"),
              ("results.*", "nan"), ("results_by_configuration.*", "nan")),  # correlation of degenerate data
}
NONFINITE_CAUSES = {
    "ntk": "check that the checkpoint's weights are finite (a damaged or badly dequantised file) and that the "
           "inputs fit the model (--max-length)",
    "spectrum": "the kernels of the ntk stage hold these values; check the checkpoint's weights",
    "krr": "the kernel or its ridge system is degenerate; raise --krr-ridges or check the checkpoint's weights",
    "dynamics": "gradient descent on the calibration set diverged; raise --dynamics-ridge or lower "
                "--dynamics-steps",
    "sweep": "fine-tuning diverged; lower --learning-rate (now {learning_rate}) or raise --lambdas",
    "probe": "the model's outputs blow up at these radii; lower --probe-radii",
    "study": "a κ-study fine-tuning run diverged; choose another --study preset or check the checkpoint's weights",
}


def check_finite(stage: str, result: dict, arrays: dict, config: RunConfig) -> None:
    """Raise RunError naming the first quantity of a stage that holds inf/nan where NONFINITE_ALLOWED allows
    none, with the likely cause."""
    bad = _first_nonfinite(stage, result, arrays)
    if bad is not None:
        cause = NONFINITE_CAUSES[stage].format(learning_rate=config.learning_rate)
        raise RunError(f"stage {stage} produced {bad}, so it was not stored; {cause}")


def _first_nonfinite(stage: str, result: dict, arrays: dict) -> str | None:
    from .schema import NONFINITE_STRINGS

    allowed = NONFINITE_ALLOWED.get(stage, ())
    for path, value in _leaves(result):  # JSON-able: non-finite floats are the strings "nan", "inf", "-inf"
        if value in NONFINITE_STRINGS and not any(fnmatch.fnmatchcase(path, p) and value == v for p, v in allowed):
            return f"{value} at {path}"
    for name, a in arrays.items():
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            return f"{int(np.sum(~np.isfinite(a)))} non-finite of {a.size} values in the array {name}"
    return None


def _leaves(obj, path: str = ""):
    """(dotted path, value) of every scalar in a JSON-able tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}.{i}" if path else str(i))
    else:
        yield path, obj


def assemble(ctx: Context, timings: dict) -> dict:
    """The results.json document (``docs/results-schema.md``)."""
    from . import __version__
    from .spectrum import DEFAULT_SIGMA_TRACE

    cfg, r = ctx.config, ctx.results
    skipped = {"skipped": "stage not run (see config.stages)"}
    spectrum = r.get("spectrum", {}).get("configurations", skipped)
    study = r.get("study")
    return {
        "schema": SCHEMA_VERSION, "jaxlin_version": __version__, "config": cfg.to_dict(),
        "environment": environment(), "timings": timings,
        "variants": {
            "kernel": "empirical NTK J Jᵀ of the LoRA parameters (head excluded, as in the paper's code), "
                      "full (N·C)×(N·C) blocks, example-major",
            "sign_kernel": "J·s(J)ᵀ, s(z)=z/(|z|+1e-8) (the published code's kernel), singular values",
            "spectrum_sigma": f"stats: kernel_statistics, kappa at σ = 0, kappa_sigma_abs at σ = {cfg.sigma_absolute} "
                              f"absolute, kappa_sigma_trace at σ = {DEFAULT_SIGMA_TRACE}·trace/n; kappa_sigma: the grid "
                              "config.sigmas × trace/n",
            "selection_sigma": f"trace-relative (scale-fair, the default): greedy κ_σ and μ_min + σ at σ = "
                               f"{DEFAULT_SIGMA_TRACE}·trace(K)/n of each candidate K; the paper's absolute σ is "
                               "select.spectral_selection(..., sigma_scale='absolute')",
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
        "correlation": ({"runs": study["runs"], "results": study["results"], "selection": study["selection"]}
                        if study else skipped),
        "selection": r["spectrum"]["selection"] if "spectrum" in r else skipped,
        "arrays": "arrays.npz",
        "inputs": ctx.inputs,
        "stages": ctx.stages,
    }


def write_results(out: Path, results: dict, arrays: dict | None = None) -> None:
    """Validate `results` and write ``results.json`` (and ``arrays.npz`` when `arrays` is given) atomically."""
    from .schema import validate_results

    validate_results(results)
    if arrays is not None:
        atomic_write(out / "arrays.npz", lambda f: np.savez(f, **arrays))
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=1, allow_nan=False).encode()))


# ------------------------------------------------------------------------------------------ output directory

LOCK_NAME = ".jaxlin.lock"  # {"pid", "host", "started"} of the run writing the directory
LOCK_WRITE_SECONDS = 10.0  # a lock still empty after this long was left by a run that died creating it


class RunError(RuntimeError):
    """The run cannot go on: its output directory is locked or unwritable, or a stage produced non-finite
    numbers. The one-line message names the problem and the fix."""


@contextlib.contextmanager
def output_directory(out: Path):
    """Create `out` if needed and hold its lock while the block runs. Temp files left by an interrupted run
    are removed first; when the block fails, the lock, this run's temp files and the directories it created
    and left empty go too."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; pass a new or existing directory")
    created = [d for d in (out, out / "stages") if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(_os_message(out, e)) from None
    try:
        lock = _acquire_lock(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        _remove_temp_files(out)
        yield
    except BaseException:
        _remove_temp_files(out, pid=os.getpid())
        raise
    finally:
        lock.unlink(missing_ok=True)
        _remove_empty(created)


def _acquire_lock(out: Path) -> Path:
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _read_lock(path)
        if not _is_stale(path, holder):
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
                   else "its lock is being written")
            raise RunError(f"{out} is in use by another jaxlin run ({who}); wait for it to finish or pass "
                           f"another --out (if that run is gone, delete {path})") from None
        _take_stale_lock(path, holder)
        log(f"note: taking over the lock of pid {holder.get('pid')} (started {holder.get('started')}), which is no "
            "longer running" if holder else f"note: taking over the empty lock {path} of a run that died taking it")
        return _acquire_lock(out)
    except OSError as e:
        raise RunError(_os_message(out, e)) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise RunError(_os_message(path, e)) from None
    return path


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # being written this instant, or damaged
        return {}


def _is_stale(path: Path, holder: dict) -> bool:
    """True when the lock's process is known dead (same host, pid not running), or when the lock has stayed
    unreadable for LOCK_WRITE_SECONDS (its writer died between creating and filling it)."""
    if not holder:
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > LOCK_WRITE_SECONDS
        return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _take_stale_lock(path: Path, holder: dict) -> None:
    """Move the stale lock aside atomically; if another run replaced it meanwhile, put that one back."""
    aside = path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another run took it over first
        return
    if _read_lock(aside) != holder:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _remove_temp_files(out: Path, pid: int | None = None) -> None:
    """Remove the temp files of `pid` (default: all, left by interrupted runs) from `out` and `out/stages`."""
    pattern = f".*.{pid}.tmp" if pid is not None else "*.tmp"
    stale = [p for d in (out, out / "stages") if d.is_dir() for p in d.glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale and pid is None:
        log(f"note: removed {len(stale)} temp file(s) left by an interrupted run in {out}")


def _remove_empty(directories) -> None:
    for d in sorted(directories, key=lambda d: len(d.parts), reverse=True):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def atomic_write(path: Path, write: Callable) -> None:
    """Write `path` through `write(binary file)` into a temp file of this process beside it and an atomic
    rename: readers see the old file or the whole new one. On failure the temp file is removed and an OSError
    becomes a one-line RunError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunError(_os_message(path, e)) from None
        raise


def _os_message(path: Path, e: OSError) -> str:
    reason = {errno.ENOSPC: "no space is left on its device; free some space or pass another --out",
              errno.EROFS: "it is on a read-only file system; pass a writable --out",
              errno.EACCES: "permission denied; pass a writable --out",
              errno.EPERM: "permission denied; pass a writable --out",
              errno.EDQUOT: "the disk quota is exceeded; free some space or pass another --out"}
    return f"cannot write {path}: {reason.get(e.errno, f'{e.strerror or e}; pass another --out')}"
