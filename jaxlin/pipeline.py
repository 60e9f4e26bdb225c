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

Each stage reads its own section of the `RunConfig` (docs/configuration.md); the stage configs of other modules
(`LoRA`, `TrainConfig`, `StudyConfig`) come from the config's conversion methods. A stage's result is stored in
``<out>/stages/<stage>.json`` (+ ``.npz``) under a key that hashes everything it read: the config, the loaded
dataset, the checkpoint's files and the jaxlin version. With ``resume=True`` a stored stage with the same key is
read back instead of recomputed; a changed input or a damaged file is recomputed, and the log says why. The sweep
and the study checkpoint their fits' training state under ``<out>/train_state/<stage>/<key>/`` while they run
(``execution.checkpoint_every``), so ``resume=True`` also continues such a stage killed midway (`checkpointing`,
docs/scaling.md "Resuming training"). A stage holding NaN/inf outside `NONFINITE_ALLOWED` is never stored.
`jaxlin.rundir` holds the run directory: its lock, atomic writes, the stage store and the training state;
docs/refusals.md lists what a run refuses. On a device mesh (``--mesh``) and as several processes
(docs/scaling.md) every process computes every stage in the same order; process 0 alone holds the lock and writes
stages, arrays, report and results.json (`_mesh_setup`, `_check_mesh_stages`, `_writes`). ``results.json`` is
assembled, validated and written once, after the report is rendered from the same dict (`write_outputs`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import flax
import jax
import jaxlib
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import __version__, data, distributed, models, select, sharding, spectrum
from ._util import to_jsonable
from .adapters import Adapted, AdaptedFunction, adapt
from .backend import check_backend, require_healthy_backend
from .compilation import compile_cache, measure_compiles
from .config import STAGES, ConfigError, RunConfig
from .data import DataError, TextDataset
from .hub_data import load_glue
from .models import Model
from .models.base import max_input_length
from .models.checkpoint import CheckpointError, resolve
from .module_ntk import module_ntks
from .next_token import run_objective
from .plan import check_plan
from .probe import probe_adapted
from .readout import LabelWordReadout, check_readout, label_word_readout, prompts
from .report import RESULTS_NAME, write_report
from .rundir import (RunError, atomic_write, clear_train_state, default_out_dir, log, output_directory, read_stage,
                     stage_key, stage_path, stage_record, train_state_dir, write_stage)
from .schema import NONFINITE_STRINGS, SCHEMA_VERSION, validate_results
from .solve import gd_dynamics, ridge_path
from .study import run_study
from .sweep import lambda_sweep, sweep_summary
from .prefix import frozen_prefix
from .train import fit, linearized_function, model_functions

ORDER = STAGES
# A full batch (dynamics, probe) is split into at most this many parts of similar length, a part added only where
# it cuts the padded tokens by more than this fraction (Context.parts): each part is one more traced copy of the
# model to compile (4–7 s a part in each stage on the default preset, whose dynamics and probe ran 51 s faster
# cold with 2 parts and 27 s with 4; benchmarks/RESULTS.md, session 14)
FULL_BATCH_PARTS, PART_MIN_SAVING = 4, 0.2


@dataclasses.dataclass
class Context:
    """What the stages share: the model, the data and the finished stages' results."""

    config: RunConfig
    out: Path
    model: Model
    adapted: Adapted  # LoRA (+ head if config.model.train_head)
    adapted_lora: Adapted  # LoRA only: the parameters of the kernels
    train: TextDataset
    eval: TextDataset
    calibration: TextDataset
    length: int  # every kernel batch is padded to this many tokens, so all kernel tiles share one compile
    # (training and evaluation batches are bucketed instead: `pad_multiple`)
    inputs: dict[str, str]  # fingerprints of what the stages read
    readout: LabelWordReadout | None = None  # model.readout "label_words": prompts in, label-word logits out
    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stages: dict[str, dict] = dataclasses.field(default_factory=dict)  # per finished stage: key, reused, seconds,
    # finished
    mesh: Mesh | None = None  # the run's device mesh (--mesh); parameters are sharded on it by jaxlin.sharding
    study: "Context | None" = None  # the study stage's own, when ``study.dataset`` gives it other data

    @functools.cached_property
    def tokenizer(self):
        """What turns texts into token ids in every stage: the label-word readout, or for the head the model's
        tokenizer, through `model.prompt_template` when one is given (both format each text as a prompt and pad
        on the right)."""
        if self.readout is not None:
            return self.readout
        template = self.config.model.prompt_template
        return self.model.tokenizer if template is None else prompts(self.model.tokenizer, template)

    @property
    def output_fn(self):
        """The readout every stage applies to the model's outputs: None (the head's logits) or the label words'."""
        return None if self.readout is None else self.readout.output_fn

    @property
    def pad_multiple(self) -> int:
        """Training and evaluation batches (dynamics, sweep, probe) are padded to their longest example rounded
        up to a multiple of this: one of at most 4 lengths up to `length` (`data.bucket_multiple`), so a step
        compiles at most 4 times and a batch of short examples is not padded to the longest of the data set.
        Left-padded batches keep `length`: a model with learned absolute positions reads a left-padded example
        at positions that depend on the padded length."""
        return data.bucket_multiple(self.length) if self.tokenizer.padding_side == "right" else self.length

    @property
    def parts(self) -> dict:
        """How a full batch (the dynamics' steps, the probe) is split into parts of similar length
        (`data.pad_parts` keywords): each pads to its own longest, so short examples are not padded to the
        longest calibration example. On a mesh (whose rows must split over the data axis) one part."""
        return {"max_parts": FULL_BATCH_PARTS if self.mesh is None else 1, "min_saving": PART_MIN_SAVING}

    def batch(self, dataset: TextDataset, *, bucketed: bool = False) -> dict:
        """All of `dataset` as one batch with int32 labels: padded to `length` (kernels: one tile shape), or with
        `bucketed` in `parts`, each padded to its longest example rounded up to `pad_multiple` (training and
        evaluation; rows in the parts' order)."""
        tok = self.tokenizer
        ids = tok.encode_unpadded(list(dataset.texts), self.config.data.max_length)
        labels = np.asarray(dataset.labels, np.int32)
        pad = dict(pad_token_id=tok.pad_token_id, pad_to_multiple_of=self.pad_multiple, padding_side=tok.padding_side)
        if bucketed and self.parts["max_parts"] > 1:
            order, parts = data.pad_parts(ids, np.ones(len(ids), bool), **self.parts, **pad)
            return {"parts": parts, "labels": labels[order]}
        return {**data.pad_batch(ids, length=None if bucketed else self.length, **pad), "labels": labels}


def environment() -> dict:
    return {"jaxlin": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "x64": bool(jax.config.jax_enable_x64),
            "backend_check": check_backend().to_dict()}


def setup(config: RunConfig, out: Path, mesh: Mesh | None = None) -> Context:
    """Load the model and the data, check them against each other, choose the calibration set, put LoRA on the
    targets and fingerprint every input (``ctx.inputs``); with a `mesh`, the parameters are sharded on it."""
    d, m = config.data, config.model
    ds = load_data(config)
    need = d.num_calibration + 2
    if len(ds) < need or ds.num_classes < 2:
        raise DataError(f"{d.dataset} has {len(ds)} examples in {ds.num_classes} class(es); jaxlin run needs "
                        f"at least {need} examples (num_calibration={d.num_calibration} + 2 to evaluate) and "
                        "two classes; add data or lower --num-calibration")
    # eval takes at most a fifth, and always leaves num_calibration examples to train on
    n_eval = max(1, min(d.num_eval, len(ds) // 5, len(ds) - d.num_calibration))
    train, eval_ = data.train_eval_split(ds, eval_size=n_eval, seed=m.seed, balanced=d.eval_split == "balanced")
    if len(train) < d.num_train:
        log(f"note: {d.dataset} has {len(train)} training examples after the split; using all of them")
    train = train.subset(np.arange(min(d.num_train, len(train))))
    calibration = data.calibration_subset(train, d.num_calibration, mode=d.calibration_mode, seed=m.seed)
    study_config = config.study_run_config() if "study" in config.stages else None
    if "study" in config.stages and study_config is None:
        _check_study_sizes(config, len(train), len(eval_))
    model = _load_model(config, ds.num_classes, mesh)
    limit = max_input_length(model.config)
    if limit is not None and d.max_length > limit:
        raise ConfigError(f"max_length={d.max_length} is longer than the {limit} positions {m.name} "
                          f"embeds; tokens past {limit} would read undefined position embeddings: pass "
                          f"--max-length {limit} or less")
    readout = _readout(config, model, ds)
    adapted, adapted_lora = run_adapters(model, config)
    if mesh is not None:
        adapted, adapted_lora = sharding.shard_adapted(adapted, mesh), sharding.shard_adapted(adapted_lora, mesh)
    inputs = {"config": config.fingerprint(), "dataset": dataset_digest(ds), "checkpoint": checkpoint_digest(m.name),
              "jaxlin": __version__, "format": SCHEMA_VERSION}
    ctx = Context(config, out, model, adapted, adapted_lora, train, eval_, calibration, 0, inputs, readout, mesh=mesh)
    longest = max(len(t) for part in (train, eval_)
                  for t in ctx.tokenizer.encode_unpadded(list(part.texts), d.max_length))
    ctx.length = min(data.round_up(longest, 8), limit or math.inf)  # padded positions must exist too
    if study_config is not None:  # loaded now, so bad study data stops the run before any stage computes
        try:
            ctx.study = setup(study_config, out, mesh)
        except (DataError, ConfigError) as e:
            raise type(e)(f"the study's own data (--study-dataset {config.study.dataset!r}): {e}") from None
    return ctx


def data_summary(ctx: Context) -> dict:
    """results.json ``data``: what a context's stages were measured on."""
    return {"dataset": ctx.config.data.dataset, "num_train": len(ctx.train), "num_eval": len(ctx.eval),
            "num_calibration": len(ctx.calibration), "label_names": list(ctx.train.label_names)}


def _check_study_sizes(config: RunConfig, num_train: int, num_eval: int) -> None:
    """Refuse, before anything is loaded or computed, a study preset that asks for more examples than the run has."""
    study = config.study_config()
    for what, need, have, flag in (("training", max(study.num_train, study.largest_calibration), num_train,
                                    "--num-train"),
                                   ("eval", study.num_eval, num_eval, "--num-eval")):
        if need > have:
            raise ConfigError(f"the study preset {config.study.preset!r} uses {need} {what} examples but the run has "
                              f"{have}; raise {flag} to {need} or more, choose a smaller --study preset, or drop "
                              "the study stage (--stages)")


def _load_model(config: RunConfig, num_labels: int, mesh: Mesh | None = None) -> Model:
    """The checkpoint with a classification head of `num_labels` outputs (``model.head`` for encoders; decoders
    have one head, `score`)."""
    m = config.model
    kind = models.family_kind(m.name)
    if m.readout == "label_words" and kind != "decoder":
        raise ConfigError(f"readout='label_words' reads a causal LM's next-token logits, but {m.name} is an {kind}; "
                          "pass --readout head, or a decoder checkpoint with --model")
    head = m.head if kind == "encoder" else None
    try:
        if m.readout == "label_words":
            model = models.load_pretrained(m.name, task="causal_lm", seed=m.seed, mesh=mesh, dtype=m.dtype)
        else:
            model = models.load_pretrained(m.name, task="classification", num_labels=num_labels, seed=m.seed,
                                           head=head, mesh=mesh, dtype=m.dtype)
    except (CheckpointError, DataError):
        raise
    except ValueError as e:  # an encoder family's own check of the head it is asked for
        if head is None:
            raise
        raise ConfigError(f"{e}; fix --head") from None
    if model.tokenizer is None:
        raise CheckpointError(f"{m.name} has no tokenizer; jaxlin run needs one to encode {config.data.dataset}: "
                              "put tokenizer.json (or vocab files) next to the weights")
    return model


def _readout(config: RunConfig, model: Model, ds: TextDataset) -> LabelWordReadout | None:
    """The label-word readout of ``model.readout = "label_words"`` (None for the head): ``model.label_words`` or
    the data's label names, one per class in label-id order, after ``model.prompt_template``."""
    m = config.model
    if m.readout != "label_words":
        return None
    words = m.label_words or tuple(ds.label_names)
    try:
        readout = label_word_readout(model.tokenizer, words, m.prompt_template)
        check_readout(readout, readout.output_fn, ds.num_classes)
    except ValueError as e:  # colliding first tokens, a template that merges with the word, a count mismatch
        raise ConfigError(f"{e}; fix --label-words or --prompt-template") from None
    if m.train_head:
        log("note: the label-word readout adds no head, so train_head is ignored (the LoRA factors train alone)")
    return readout


def run_adapters(model: Model, config: RunConfig) -> tuple[Adapted, Adapted]:
    """(LoRA + head if model.train_head and the readout is the head, LoRA only) per the ``lora`` section."""
    lora = config.lora_spec()
    head = config.model.train_head and config.model.readout == "head"
    try:
        return adapt(model, lora=lora, head=head), adapt(model, lora=lora)
    except ConfigError:  # already names its flag
        raise
    except ValueError as e:  # adapters' checks of the layers and targets against this model's modules
        raise ConfigError(f"{e}; fix --layers or --targets") from None


def load_data(config: RunConfig) -> TextDataset:
    """The ``data`` section's data set: a packaged name, ``glue/<task>`` from the hub, or a user file."""
    d = config.data
    file_options = dict(label_names=d.label_names, missing_labels=d.missing_labels, encoding=d.encoding,
                        skip_empty=d.skip_empty)
    if d.dataset.startswith("glue/"):
        data.refuse_file_options(d.dataset, **file_options)
        return load_glue(d.dataset.split("/", 1)[1])
    return data.load_dataset(d.dataset, text_column=d.text_column, label_column=d.label_column, **file_options)


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
    k = ctx.config.kernel
    cal = ctx.batch(ctx.calibration)
    modules = ctx.adapted_lora.lora_modules
    kw = dict(trace_axes=(), implementation=k.implementation, block_size=ctx.config.kernel_block_size(),
              progress=True, output_fn=ctx.output_fn, mesh=ctx.mesh)
    t = time.perf_counter()
    grams = module_ntks(ctx.adapted_lora, cal, **kw)
    seconds = time.perf_counter() - t
    arrays = {f"gram/{m}": g for m, g in grams.items()}
    if k.sign_kernel:
        arrays.update({f"gram_sign/{m}": g for m, g in module_ntks(ctx.adapted_lora, cal, kernel="sign",
                                                                   **kw).items()})
    shape = next(iter(grams.values())).shape
    return {"modules": list(modules), "shape": list(shape), "implementation": k.implementation,
            "seconds_ntk": seconds, "max_length": int(cal["input_ids"].shape[1]),
            "real_lengths": cal["attention_mask"].sum(1).tolist()}, arrays


def module_grams(ctx: Context, sign: bool = False) -> dict:
    prefix = "gram_sign/" if sign else "gram/"
    return {k[len(prefix):]: v for k, v in ctx.arrays.items() if k.startswith(prefix)}


def stage_spectrum(ctx: Context):
    """`spectrum.kernel_statistics` of every configuration family (single, layer, projection, top-k, all), the
    κ_σ grid over kernel.sigmas (× trace/n) and `select.spectral_selection` (the selection of results.json)."""
    k_cfg = ctx.config.kernel
    grams = module_grams(ctx)
    signs = module_grams(ctx, sign=True)
    resid0 = _calibration_residual(ctx)
    configs = {}
    for family in select.FAMILIES:
        for name, mods in select.enumerate_configurations(list(grams), family).items():
            configs.setdefault(name, (family, mods))
    statistics = dict(sigma_absolute=k_cfg.sigma_absolute, sigma_trace=spectrum.DEFAULT_SIGMA_TRACE)
    out, arrays = {}, {}
    for name, (family, mods) in configs.items():
        k = select.configuration_kernel(grams, mods)
        eigenvalues = spectrum.spectrum_stats(k)["eigenvalues"]
        entry = {"modules": list(mods), "family": family,
                 "stats": {"eigenvalues": eigenvalues, **spectrum.kernel_statistics(k, resid0, **statistics)},
                 "kappa_sigma": spectrum.condition_numbers(k, k_cfg.sigmas, sigma_scale="trace")}
        if signs:
            k_sign = select.configuration_kernel(signs, mods)
            entry["sign_stats"] = {"singular_values": spectrum.sign_kernel_stats(k_sign)["singular_values"],
                                   **spectrum.kernel_statistics(k_sign, kernel="sign", **statistics)}
        out[name] = entry
        arrays[f"eig/{name}"] = eigenvalues
    selection = select.spectral_selection(grams, ctx.config.study.selection_budget, resid0,
                                          seed=ctx.config.model.seed)
    return {"configurations": out, "selection": selection}, arrays


def _onehot(ctx: Context, labels) -> np.ndarray:
    return np.eye(ctx.train.num_classes)[np.asarray(labels)]


def _outputs(ctx: Context, batch):
    """Logits at θ0 (LoRA B = 0, so those of the base model with its head, or its zero-shot label-word logits),
    float64 on the host (on a mesh: inputs replicated, logits gathered from every process)."""
    ad = ctx.adapted_lora  # the function is an argument of the jit, so its frozen weights are inputs
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if ctx.mesh is not None:
        x = sharding.place(x, {k: NamedSharding(ctx.mesh, P()) for k in x})
    logits = jax.jit(AdaptedFunction.__call__)(ad.as_function(ctx.output_fn), ad.trainable, x)
    return np.asarray(distributed.to_host(logits), np.float64)


def _calibration_residual(ctx: Context) -> np.ndarray:
    """r0 = onehot(y) − f(θ0) on the calibration set, flattened example-major to (N·C,)."""
    y = _onehot(ctx, ctx.calibration.labels)
    return (y - _outputs(ctx, ctx.batch(ctx.calibration))).reshape(-1)


def stage_krr(ctx: Context):
    k_cfg = ctx.config.kernel
    krr_set = ctx.train.subset(np.arange(min(k_cfg.num_krr, len(ctx.train))))
    krr_eval = ctx.eval.subset(np.arange(min(k_cfg.num_krr, len(ctx.eval))))  # the cross kernel costs M·N
    xb, eb = ctx.batch(krr_set), ctx.batch(krr_eval)
    kw = dict(trace_axes=(), implementation=k_cfg.implementation, block_size=ctx.config.kernel_block_size(),
              progress=True, output_fn=ctx.output_fn, mesh=ctx.mesh)
    k_train = sum(module_ntks(ctx.adapted_lora, xb, **kw).values())
    k_cross = sum(module_ntks(ctx.adapted_lora, eb, xb, **kw).values())
    f0_train, f0_eval = _outputs(ctx, xb), _outputs(ctx, eb)
    y = _onehot(ctx, krr_set.labels)
    path = ridge_path(k_train, y - f0_train, np.asarray(k_cfg.krr_ridges), ridge_scale="trace")
    pred_eval = np.asarray(path.predict(k_cross, f0_eval))  # (K, M, O)
    pred_train = np.asarray(path.train_predictions(f0_train))
    acc = lambda p, labels: [float(np.mean(np.argmax(q, -1) == labels)) for q in p]  # noqa: E731
    return {"configuration": "all", "num_train": len(krr_set), "ridges": list(k_cfg.krr_ridges),
            "ridge_scale": "trace", "ridges_absolute": np.asarray(path.ridges).tolist(),
            "num_eval": len(krr_eval), "eval_accuracy": acc(pred_eval, krr_eval.labels),
            "train_accuracy": acc(pred_train, krr_set.labels),
            "objective": np.asarray(path.objective).tolist(),
            "eval_accuracy_at_init": float(np.mean(np.argmax(f0_eval, -1) == krr_eval.labels)),
            "targets": "one-hot, residual Y - f0"}, {"krr/k_train": k_train}


def stage_dynamics(ctx: Context):
    """Full-batch GD with squared loss on the calibration set, LoRA parameters only (those of the kernel)."""
    cfg = ctx.config
    n = len(ctx.calibration)
    k = spectrum.as_matrix(sum(module_grams(ctx).values()))
    resid0 = _calibration_residual(ctx)
    ridge_sum = cfg.dynamics.ridge * np.trace(k) / k.shape[0]  # ridge of the summed objective ½Σ‖r‖² + ½λΣ‖δ‖²
    mu_max = float(np.linalg.eigvalsh(k)[-1])
    lr_sum = 1.0 / (mu_max + ridge_sum)
    # the trainer minimises the mean over n examples: lr_mean = n·lr_sum and λ_mean = λ_sum / n give the same path
    steps = cfg.dynamics.steps
    predicted = gd_dynamics(k, resid0, ridge_sum, lr_sum, np.arange(steps))
    tc = cfg.dynamics_train_config(learning_rate=n * lr_sum, batch_size=n, strength=ridge_sum / n,
                                   pad_to_multiple_of=ctx.pad_multiple)
    own_rows = functools.partial(distributed.process_rows, fix="--num-calibration")
    nonlinear, linearized = model_functions(ctx.adapted_lora, ctx.output_fn)
    theta0 = ctx.adapted_lora.trainable
    prefix = frozen_prefix(nonlinear, theta0) if cfg.train.frozen_prefix and ctx.mesh is None else None
    if prefix is not None:  # one full batch: its blocks below the lowest trained one run once
        nonlinear, linearized = prefix.function, linearized_function(prefix.function, theta0)
    attach = (lambda b: b) if prefix is None else prefix.attach
    batches = lambda epoch: map(own_rows, map(attach, data.batches(  # noqa: E731
        ctx.calibration, ctx.tokenizer, batch_size=n, max_length=tc.max_length,
        pad_to_multiple_of=tc.pad_to_multiple_of, **ctx.parts)))
    measured = {name: fit(fn, theta0, batches, config=tc, progress=False,
                          mesh=ctx.mesh).train_loss
                for name, fn in (("linearized", linearized), ("nonlinear", nonlinear))}
    return {"steps": list(range(steps)), "learning_rate": n * lr_sum, "learning_rate_summed": lr_sum,
            "ridge": ridge_sum / n, "ridge_summed": ridge_sum, "ridge_relative": cfg.dynamics.ridge,
            "predicted_loss": (np.asarray(predicted.loss) / n).tolist(),
            "measured_loss_linearized": measured["linearized"], "measured_loss_nonlinear": measured["nonlinear"],
            "loss": "mean over examples of ½‖f − onehot(y)‖²",
            "prefix_start_layer": 0 if prefix is None else prefix.start_layer}, {}


def stage_sweep(ctx: Context):
    t = ctx.config.train
    results = lambda_sweep(ctx.adapted, ctx.train, ctx.eval, ctx.tokenizer, lambdas=list(t.lambdas),
                           config=ctx.config.sweep_train_config(ctx.pad_multiple), regularizer=t.regularizer,
                           progress=True, num_train_evaluated=min(t.num_train_evaluated, len(ctx.train)),
                           objective=run_objective(t.objective, ctx.readout), mesh=ctx.mesh,
                           frozen_prefix=t.frozen_prefix, **checkpointing(ctx, "sweep"), log=log)
    for r in results:  # the schema's headline output distance is the eval one; no radius at λ = 0
        r["output_distance_lin_nonlin"] = r["output_distance_lin_nonlin_eval"]
        if r["theorem2_radius"] is None:
            r["theorem2_radius"] = float("nan")
    summary = sweep_summary(results)
    return {"sweep": results, "sweep_summary": {**summary["slopes"],
                                                "theorem2_radius": summary["theorem2_radius_slope"]}}, {}


def stage_probe(ctx: Context):
    p = ctx.config.probe
    return probe_adapted(ctx.adapted_lora, ctx.batch(ctx.calibration, bucketed=True), radii=list(p.radii),
                         num_directions=p.directions, num_tangents=p.tangents, seed=ctx.config.model.seed,
                         output_fn=ctx.output_fn, mesh=ctx.mesh, frozen_prefix=ctx.config.train.frozen_prefix), {}


def stage_study(ctx: Context):
    study = ctx.config.study_config()
    result = run_study(ctx.model, ctx.train, ctx.eval, study, tokenizer=ctx.tokenizer, output_fn=ctx.output_fn,
                       objective=run_objective(ctx.config.train.objective, ctx.readout), progress=True,
                       mesh=ctx.mesh, **checkpointing(ctx, "study"))
    used = {"num_train": study.num_train, "num_eval": study.num_eval,  # the first of ctx's splits (run_study)
            "num_calibration": study.largest_calibration}
    return {**result, "data": {**data_summary(ctx), **used}}, {}  # its own data with ``study.dataset``


def checkpointing(ctx: Context, stage: str) -> dict:
    """The checkpoint arguments of `stage`'s fits ({} when ``execution.checkpoint_every`` is off): its training
    state directory and key, both from the stage's key (`rundir.train_state_dir`), so a checkpoint left by other
    inputs is never read back (docs/scaling.md, "Resuming training")."""
    every = ctx.config.execution.checkpoint_every
    if not every:
        return {}
    key = stage_key(stage, ctx.inputs)
    return {"checkpoint_dir": train_state_dir(ctx.out, stage, _train_state_name(key)), "checkpoint_every": every,
            "checkpoint_key": f"jaxlin run {stage} stage {key}"}


def _train_state_name(key: str) -> str:
    """The directory name of a stage key's training state. It holds the number of processes: each process's share
    of a batch enters its fits' checkpoint keys, so a run resumed as another number of processes starts the
    stage's fits afresh instead of meeting checkpoints that `fit` refuses."""
    return f"{key}-{jax.process_count()}proc"


STAGE_FUNCTIONS: dict[str, Callable] = {"ntk": stage_ntk, "spectrum": stage_spectrum, "krr": stage_krr,
                                        "dynamics": stage_dynamics, "sweep": stage_sweep, "probe": stage_probe,
                                        "study": stage_study}
NEEDS = {"spectrum": ("ntk",), "dynamics": ("ntk",)}


# --------------------------------------------------------------------------------------------------- runner

def run(config: RunConfig, out: Path | None = None, *, resume: bool = False) -> Path:
    """Run the configured stages; write ``arrays.npz``, ``report.html`` and ``results.json`` to ``out``, which
    the run holds locked (`rundir.output_directory`) until it ends. JAX's persistent compilation cache is
    ``execution.compile_cache`` for the whole run, set before its first compile (`compilation.compile_cache`)."""
    with compile_cache(config.execution.compile_cache) as cache_directory:
        return _run(config, out, resume, cache_directory)


def _run(config: RunConfig, out: Path | None, resume: bool, cache_directory: str | None) -> Path:
    jax.config.update("jax_enable_x64", True)  # float64 Gram accumulation and eigensolves
    require_healthy_backend()  # before anything is computed or written: a miscompiling jaxlib stops the run here
    mesh = _mesh_setup(config, out)
    _check_mesh_stages(config, mesh)
    check_plan(config, mesh)  # a run that cannot fit on its devices stops here, before anything is loaded
    out = Path(out) if out is not None else default_out_dir(config.preset, resume)
    with output_directory(out) if _writes() else contextlib.nullcontext():
        log(f"jaxlin run: preset {config.preset}, output {out}"
            + (f", compile cache {cache_directory}" if cache_directory else ""))
        t = time.perf_counter()
        with measure_compiles() as compiles, data.count_tokens() as tokens:
            ctx = setup(config, out, mesh)
        timings = {"setup": time.perf_counter() - t}
        efficiency = {"setup": _efficiency(compiles, tokens)}
        wanted = [s for s in ORDER if s in config.stages and s != "report"]
        for dep in [d for s in wanted for d in NEEDS.get(s, ())]:
            if dep not in wanted:
                wanted.insert(0, dep)
        for i, stage in enumerate([s for s in ORDER if s in wanted], 1):
            own = ctx.study if stage == "study" and ctx.study is not None else ctx  # its inputs key the stage
            result, arrays, record, efficiency[stage] = _run_stage(own, stage, resume)
            ctx.results[stage], ctx.stages[stage], timings[stage] = result, record, record["seconds"]
            ctx.arrays.update(arrays)
            seconds = record["seconds"]
            log(f"[{i}/{len(wanted)}] {stage}: "
                + (f"reused (computed in {seconds:.1f} s)" if record["reused"] else f"done in {seconds:.1f} s"))
        if _writes():
            results = assemble(ctx, timings, efficiency_section(efficiency, timings, cache_directory))
            write_outputs(out, results, ctx.arrays, report="report" in config.stages)
    return out


def _efficiency(compiles, tokens: data.TokenCount) -> dict:
    """What a stage stores of its compiles and padded tokens (`efficiency_section` reads it)."""
    return {"compile_seconds": compiles.seconds, "compiled_programs": compiles.programs,
            "cache_hits": compiles.cache_hits, "real_tokens": tokens.real, "processed_tokens": tokens.processed}


def efficiency_section(per_stage: dict[str, dict | None], timings: dict, cache_directory: str | None) -> dict:
    """results.json ``efficiency`` (docs/results-schema.md) from each stage's `_efficiency` (None: a stage
    stored by a jaxlin that did not record it); ``token_fill`` only for the stages that padded token batches."""
    known = {stage: e for stage, e in per_stage.items() if e is not None}
    return {"compile_cache": cache_directory,
            "compile_seconds": {s: e["compile_seconds"] for s, e in known.items()},
            "compute_seconds": {s: max(0.0, timings[s] - e["compile_seconds"]) for s, e in known.items()},
            "compiled_programs": {s: e["compiled_programs"] for s, e in known.items()},
            "cache_hits": {s: e["cache_hits"] for s, e in known.items()},
            "token_fill": {s: e["real_tokens"] / e["processed_tokens"] for s, e in known.items()
                           if e["processed_tokens"]},
            "tokens": {s: {"real": e["real_tokens"], "processed": e["processed_tokens"]} for s, e in known.items()
                       if e["processed_tokens"]}}


def _run_stage(ctx: Context, stage: str, resume: bool) -> tuple[dict, dict, dict, dict | None]:
    """The stage's result, arrays, record ({key, reused, seconds, finished}) and efficiency (its compiles and
    padded tokens, `_efficiency`; kept when reused, None when stored without): read back when ``resume`` finds
    it stored with the same key, else computed, checked for non-finite numbers and stored."""
    path = stage_path(ctx.out, stage)
    key = stage_key(stage, ctx.inputs)
    if resume and _every_process(path.exists()):
        stored, arrays, why = read_stage(path, key, ctx.inputs)
        if _every_process(stored is not None):  # all reuse or all recompute: the stages' collectives must match
            return stored["result"], arrays, stage_record(stored, reused=True), stored.get("efficiency")
        log(f"{stage}: recomputing: {why or 'another process cannot read its stored copy'}")
    if stage in CHECKPOINTED:
        _prepare_train_state(ctx, stage, key, resume)
    t = time.perf_counter()
    with measure_compiles() as compiles, data.count_tokens() as tokens:
        result, arrays = STAGE_FUNCTIONS[stage](ctx)
    seconds = time.perf_counter() - t
    efficiency = _efficiency(compiles, tokens)
    result = to_jsonable(result)
    check_finite(stage, result, arrays, ctx.config)
    stored = {"stage": stage, "key": key, "inputs": ctx.inputs, "seconds": seconds,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "arrays": sorted(arrays), "result": result, "efficiency": efficiency}
    if _writes():
        write_stage(path, stored, arrays)
        if stage in CHECKPOINTED:  # the stored stage is what --resume reads now
            clear_train_state(ctx.out, stage)
    return result, arrays, stage_record(stored, reused=False), efficiency


# The stages whose fits checkpoint their training state (`checkpointing`), so --resume continues them mid-stage
CHECKPOINTED = ("sweep", "study")


def _prepare_train_state(ctx: Context, stage: str, key: str, resume: bool) -> None:
    """Before `stage` runs: remove the training state that it must not continue (another key's; all of it
    without `resume`), on the writing process while the others wait, and say what is continued."""
    name = _train_state_name(key)
    directory = train_state_dir(ctx.out, stage, name)
    if _writes() and clear_train_state(ctx.out, stage, keep=name if resume else None):
        log(f"{stage}: removed the training state an earlier run left in {directory.parent} ("
            + ("of other inputs or another number of processes" if resume else
               "pass --resume to continue it instead") + ")")
    if jax.process_count() > 1:  # no process opens a checkpoint before the stale ones are gone
        multihost_utils.sync_global_devices(f"jaxlin {stage} training state")
    if resume and ctx.config.execution.checkpoint_every and directory.is_dir():
        log(f"{stage}: resuming from the training state in {directory}")


# ------------------------------------------------------------------------------------ mesh and processes

def _mesh_setup(config: RunConfig, out) -> Mesh | None:
    """The run's (data, model) mesh from ``mesh.shape`` (None without one), after the checks of a multi-process
    run: a mesh and an --out every process shares. The processes joined before (`jaxlin.cli.join_processes`)."""
    processes = jax.process_count()
    if processes > 1 and (config.mesh.shape is None or out is None):
        raise ConfigError(f"this run has {processes} processes: pass --mesh (e.g. data={len(jax.devices())},"
                          "model=1) and --out DIR, a directory every process can read")
    if config.mesh.shape is None:
        return None
    try:
        mesh = distributed.parse_mesh(config.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"{e}; fix --mesh") from None
    log(f"mesh {dict(mesh.shape)} over {len(jax.devices())} device(s) of {processes} process(es); process "
        f"{jax.process_index()}" + (" writes the run directory" if _writes() else " computes, process 0 writes"))
    return mesh


def _check_mesh_stages(config: RunConfig, mesh: Mesh | None) -> None:
    """Refuse, before anything is loaded, batch sizes that do not split over the processes (each feeds its share of
    a batch's rows) or over the mesh's data axis (each data shard takes an equal share of a step's rows)."""
    processes = jax.process_count()
    data_size = 1 if mesh is None else mesh.shape.get("data", 1)
    multiple = math.lcm(processes, data_size)
    if multiple == 1:
        return
    over = " and ".join(([f"the {processes} processes"] if processes > 1 else [])
                        + ([f"the data axis of size {data_size}"] if data_size > 1 else []))
    splits = {"dynamics": [("--num-calibration", config.data.num_calibration)],
              "sweep": [("--batch-size", config.train.batch_size)]}
    if "study" in config.stages:
        sc = config.study_config()
        splits["study"] = [(f"--study {config.study.preset}'s {name}", rows)
                           for name, rows in (("batch size", sc.batch_size), ("eval batch size", sc.eval_batch_size))]
    for stage, sizes in splits.items():
        for flag, rows in sizes:
            if stage in config.stages and rows % multiple:
                raise ConfigError(f"{flag} {rows} does not split over {over} of the {stage} stage; choose a "
                                  f"multiple of {multiple}" + (" (another --study preset, or a smaller --mesh data "
                                                               "axis or fewer processes)" if stage == "study" else ""))


def _writes() -> bool:
    """Whether this process writes the run directory (lock, stages, arrays, report, results.json): process 0."""
    return distributed.is_main_process()


def _every_process(flag: bool) -> bool:
    """`flag` and-ed over every process (itself with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


# Where a stage may hold a non-finite number, and which one; every other number of a stage must be finite.
# Patterns match the dotted path of a value (dict keys and list indices joined by ".").
NONFINITE_ALLOWED = {
    "spectrum": (("configurations.*kappa*", "inf"), ("selection.methods.*.scores.*", "inf")),  # a singular kernel
    "sweep": (("sweep.*.theorem2_radius", "nan"),  # no radius at λ = 0
              ("sweep_summary.*", "nan"),  # a slope needs two usable λ
              ("sweep.*.relative_module_distances.*", "inf")),  # a module whose initial weights are zero
    "study": (("runs.*.statistics.*kappa*", "inf"), ("selection.methods.*.statistics.*kappa*", "inf"),
              ("selection.methods.*.scores.*", "inf"),
              ("runs.*.krr_*", "nan"), ("selection.methods.*.krr_*", "nan"),  # K_S + λI not positive definite
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
        cause = NONFINITE_CAUSES[stage].format(learning_rate=config.train.learning_rate)
        raise RunError(f"stage {stage} produced {bad}, so it was not stored; {cause}")


def _first_nonfinite(stage: str, result: dict, arrays: dict) -> str | None:
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



def assemble(ctx: Context, timings: dict, efficiency: dict) -> dict:
    """The results.json document (``docs/results-schema.md``); ``config`` is the nested `RunConfig.to_dict`,
    ``efficiency`` the run's `efficiency_section`."""
    cfg, r = ctx.config, ctx.results
    skipped = {"skipped": "stage not run (see config.stages)"}
    study = r.get("study")
    return {
        "schema": SCHEMA_VERSION, "jaxlin_version": __version__, "config": cfg.to_dict(),
        "environment": environment(), "timings": timings, "efficiency": efficiency,
        "variants": {
            "kernel": "empirical NTK J Jᵀ of the LoRA parameters (head excluded, as in the paper's code), "
                      "full (N·C)×(N·C) blocks, example-major",
            "sign_kernel": "J·s(J)ᵀ, s(z)=z/(|z|+1e-8) (the published code's kernel), singular values",
            "spectrum_sigma": f"stats: kernel_statistics, kappa at σ = 0, kappa_sigma_abs at σ = "
                              f"{cfg.kernel.sigma_absolute} absolute, kappa_sigma_trace at σ = "
                              f"{spectrum.DEFAULT_SIGMA_TRACE}·trace/n; kappa_sigma: the grid config.kernel.sigmas "
                              "× trace/n",
            "selection_sigma": f"trace-relative (scale-fair, the default): greedy κ_σ and μ_min + σ at σ = "
                               f"{spectrum.DEFAULT_SIGMA_TRACE}·trace(K)/n of each candidate K; the paper's absolute "
                               "σ is select.spectral_selection(..., sigma_scale='absolute')",
            "calibration": f"{cfg.data.calibration_mode} {cfg.data.num_calibration} of the seeded, shuffled "
                           "training split",
            "inputs": "token ids through the full model, real lengths, proper mask; kernel batches padded to one "
                      f"length ({ctx.length}), training and evaluation batches to their longest example rounded "
                      f"up to a multiple of {ctx.pad_multiple}",
            "regularizer": cfg.train.regularizer, "anchor": cfg.train.anchor, "loss": cfg.train.loss,
            "head": cfg.model.head, "lora_init": cfg.lora.init, "krr_targets": "one-hot, residual Y − f0",
        },
        "data": data_summary(ctx),
        "model": {"source": str(cfg.model.name), "family": ctx.model.family, "num_layers": ctx.model.num_layers,
                  "modules": list(ctx.adapted.modules), "num_trainable_params": ctx.adapted.num_params()},
        "readout": readout_section(ctx),
        "spectrum": r.get("spectrum", {}).get("configurations", skipped),
        "krr": r.get("krr", skipped),
        "dynamics": r.get("dynamics", skipped),
        "sweep": r.get("sweep", {}).get("sweep", []),
        "sweep_summary": r.get("sweep", {}).get("sweep_summary", {}),
        "probe": r.get("probe", skipped),
        "correlation": ({"runs": study["runs"], "results": study["results"],
                         "results_by_configuration": study["results_by_configuration"], "selection": study["selection"],
                         "data": study.get("data", data_summary(ctx.study or ctx))}  # stored before jaxlin recorded it
                        if study else {"skipped": "stage not run (see config.stages); add it to this run with "
                                                  "jaxlin run --stages all --resume --out <this directory>"}),
        "selection": r["spectrum"]["selection"] if "spectrum" in r else skipped,
        "arrays": "arrays.npz",
        "inputs": ctx.inputs,
        "stages": ctx.stages,
    }


# What each stage that ran fitted (docs/results-schema.md): the sweep and the study train `train.objective`; the
# others their own
STAGE_OBJECTIVES = {"ntk": "none", "spectrum": "none", "krr": "none", "probe": "none", "dynamics": "squared"}


def readout_section(ctx: Context) -> dict:
    """How a class score is read, what each stage that ran trained on, and the accuracy at θ0 on the KRR stage's
    eval examples (the model's own zero-shot accuracy for label words; a fresh head's for the head readout),
    null when krr did not run."""
    krr = ctx.results.get("krr")
    common = ({"zero_shot_eval_accuracy": None, "zero_shot_num_eval": 0} if krr is None else
              {"zero_shot_eval_accuracy": krr["eval_accuracy_at_init"], "zero_shot_num_eval": krr["num_eval"]})
    objective = ctx.config.train.objective
    common |= {"objective": objective, "stage_objectives": {s: STAGE_OBJECTIVES.get(s, objective)
                                                             for s in ctx.results}}
    if ctx.readout is None:
        template = {} if ctx.config.model.prompt_template is None else {"template": ctx.config.model.prompt_template}
        return {"kind": "head", "head": ctx.config.model.head if ctx.model.kind == "encoder" else "score",
                "trained": ctx.config.model.train_head, **template, **common}
    r = ctx.readout
    return {"kind": "label_words", "label_words": list(r.label_words), "token_ids": list(r.token_ids),
            "template": r.template, "trained": False, **common}


def write_outputs(out: Path, results: dict, arrays: dict, *, report: bool) -> None:
    """Validate `results` once, then write ``arrays.npz``, ``report.html`` (when `report`: rendered from
    `results` itself; its rendering time goes to ``timings.report``, which the page therefore omits) and last
    ``results.json``, each atomically, so a results.json on disk always comes with its arrays and report."""
    validate_results(results)
    atomic_write(out / results["arrays"], lambda f: np.savez(f, **arrays))
    if report:
        t = time.perf_counter()
        write_report(out, results, {k: (np.shape(v), str(np.asarray(v).dtype)) for k, v in arrays.items()})
        results["timings"]["report"] = time.perf_counter() - t
    atomic_write(out / RESULTS_NAME, lambda f: f.write(json.dumps(results, indent=1, allow_nan=False).encode()))
