"""Fine-tuning with optax: one loop for the nonlinear model and its linearization (docs/paper.md §3, §4, §7.1).

    min_θ  mean_i ℓ(f_θ(x_i), y_i)  +  (λ/2)‖θ − a‖²        (a = θ0 or 0; the pull per `TrainConfig.regularizer`)

`fit` trains any `apply_fn(trainable, batch) -> logits (B, C)` (``batch`` holds input_ids and attention_mask);
`model_functions(adapted)` gives the two that matter here, the real model f (`Adapted.as_function`) and its
first-order Taylor model f̄ at θ0 (`jaxlin.linearize`), so both run through the same optimiser, schedule, batches
and regulariser.

Functions as data. `Adapted.as_function` returns a pytree callable and `model_functions`, `make_loss_fn` and
`make_train_step` return `jax.tree_util.Partial`s: plain callables that are also pytrees whose leaves are the
arrays they need (the frozen weights, θ0). `fit` passes the step into the one `jax.jit` of training as an
argument, so those arrays are inputs of the compiled program, not constants baked into it (a closure would copy
every frozen weight into the HLO), and runs with the same model and optimiser object share one compiled step.
Plain Python functions work too; they become leafless Partials.

Compilation. Every batch from `jaxlin.data.batches` has the same leading size (a short last batch is padded
and marked `example_mask` 0), but bucketed padding gives L = the batch's longest sequence rounded up to a
multiple of 8, so the step compiles once per distinct L (a handful: ⌈max_length/8⌉ at most), then never again.

Meshes and preemption (docs/scaling.md): `fit(mesh=)` splits batches over the mesh's data axis and keeps
the parameters' own shardings (`jaxlin.train_mesh`); `fit(checkpoint_dir=)` saves and resumes the run with Orbax
(`jaxlin.train_checkpoint`).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.tree_util import Partial

from .adapters import AdaptedFunction
from .data import batch_parts
from .linearize import linearize
from .prefix import PREFIX_KEY
from .models.base import check_inputs
from .regularizers import SelectiveProxState, adamspd, prox_l2, selective_prox
from .train_checkpoint import TrainCheckpoint, json_floats, run_key
from .train_mesh import MeshPlan

SCHEDULES = ("linear", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cross_entropy", "squared")
REGULARIZERS = ("none", "prox", "prox_decoupled", "selective", "selective_per_tensor", "adamspd")
ANCHORS = ("init", "zero")
_STEP_KEYS = ("input_ids", "attention_mask", "labels", "example_mask", PREFIX_KEY, "parts")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run; the defaults follow the paper's script (docs/paper.md §7.1).

    learning_rate: peak step size η (parameter units per unit gradient for sgd; per step for adam).
    epochs / steps: length of the run, in passes over the training batches or in optimiser steps; give at
      most one (neither = 1 epoch). With `steps` the batches cycle through as many epochs as needed.
    batch_size: examples per optimiser step.
    warmup_ratio: fraction of all steps spent warming η up linearly from 0 (0.06 as in the paper).
    schedule: "linear" = warmup then linear decay to 0 at the last step; "constant" = warmup then η.
    optimizer: "adam", "adamw" (decoupled decay toward 0 of `weight_decay` per unit η) or "sgd".
    weight_decay: AdamW's decay coefficient (1/parameter-unit, dimensionless per step per unit η); adamw only.
    loss: "cross_entropy" on the logits, or "squared" = ½‖f − onehot(y)‖² summed over outputs; both averaged
      over the real examples of a batch (`example_mask` 1).
    regularizer: "none"; "prox" R1 coupled, g += λ(θ − a) before the optimiser; "prox_decoupled" R1 after it,
      θ −= η_t λ(θ − a); "selective" R2 (Eq. 8) with one global sign test; "selective_per_tensor" R2 per
      tensor; "adamspd" R3, which replaces the optimiser (needs optimizer="adam").
    strength: λ ≥ 0, in units of the (mean) loss per squared parameter distance; for adamspd the SPD
      projection strength (dimensionless).
    anchor: where the pull points: "init" = θ0 (LoRA (A0, B0 = 0)) or "zero".
    seed: seeds batch shuffling (`jaxlin.sweep` uses it; `fit` itself is deterministic).
    max_length: tokens per example after truncation (used where batches are built from text).
    pad_to_multiple_of: batch lengths are rounded up to a multiple of this; each distinct length compiles
      the step once, so on CPU a value equal to max_length (one compile) is often fastest.
    eval_every_epoch: evaluate after each epoch (else only at the end).
    """

    learning_rate: float = 4e-3
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 16
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    regularizer: str = "none"
    strength: float = 0.0
    anchor: str = "init"
    seed: int = 0
    max_length: int = 128
    pad_to_multiple_of: int = 8
    eval_every_epoch: bool = True

    def __post_init__(self):
        for name, allowed in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("loss", LOSSES),
                              ("regularizer", REGULARIZERS), ("anchor", ANCHORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        _check_real("learning_rate", self.learning_rate, "> 0, e.g. 4e-3", lambda v: v > 0)
        _check_real("warmup_ratio", self.warmup_ratio, "in [0, 1), e.g. 0.06", lambda v: 0 <= v < 1)
        _check_real("strength", self.strength, "≥ 0 (λ of (λ/2)‖θ−θ0‖²)", lambda v: v >= 0)
        _check_real("weight_decay", self.weight_decay, "≥ 0", lambda v: v >= 0)
        for name in ("batch_size", "max_length", "pad_to_multiple_of"):
            _check_int(name, getattr(self, name))
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"TrainConfig got epochs={self.epochs} and steps={self.steps}; give one of them")
        for name in ("epochs", "steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        if self.regularizer == "none" and self.strength != 0:
            raise ValueError(f"TrainConfig.strength={self.strength} needs a regularizer; set regularizer='prox' "
                             f"(or another of {REGULARIZERS[1:]}) or strength=0")
        if self.regularizer == "adamspd" and self.optimizer != "adam":
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r} with regularizer='adamspd': AdamSPD is "
                             "itself an Adam optimiser; set optimizer='adam'")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay} applies to optimizer='adamw' only "
                             f"(got {self.optimizer!r}); set weight_decay=0 or optimizer='adamw'")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the run: `steps`, else `epochs` (default 1) × steps_per_epoch."""
        return self.steps if self.steps is not None else (self.epochs or 1) * steps_per_epoch


def _check_real(name, value, allowed, ok):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or not ok(value):
        raise ValueError(f"TrainConfig.{name}={value!r} must be a finite number {allowed}")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an integer ≥ 1")


# ------------------------------------------------------------------------------------------ optimiser
def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """η_t: linear warmup over ⌈warmup_ratio·total_steps⌉ steps (as HF Trainer), then linear decay to 0 at
    `total_steps` ("linear") or constant η ("constant"). η_0 = 0 whenever there is a warmup."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    lr = config.learning_rate
    after = (optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1)) if config.schedule == "linear"
             else optax.constant_schedule(lr))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimiser with `config`'s regulariser: coupled R1/R2 chained BEFORE it (they act on the raw loss
    gradient), decoupled R1 AFTER it (like AdamW), AdamSPD instead of it.

    λ lives in the optimiser state (`optax.inject_hyperparams`, under `hyperparams["strength"]` or
    `["weight_decay"]`), not in the compiled program, so runs that differ only in λ lower to the same program
    (and hit JAX's persistent compilation cache when it is on)."""
    _check_int("total_steps", total_steps)
    lr = learning_rate_schedule(config, total_steps)
    lam, anchor = config.strength, config.anchor
    if config.regularizer == "adamspd":
        return optax.inject_hyperparams(adamspd, static_args=("b1", "b2", "eps"))(lr, lam, anchor=anchor)
    base = {"adam": lambda: optax.adam(lr), "sgd": lambda: optax.sgd(lr),
            "adamw": lambda: optax.adamw(lr, weight_decay=config.weight_decay)}[config.optimizer]()
    if config.regularizer == "none":
        return base
    if config.regularizer == "prox":
        return optax.chain(optax.inject_hyperparams(prox_l2)(lam, anchor=anchor), base)
    if config.regularizer == "prox_decoupled":
        pull = optax.inject_hyperparams(prox_l2)(lam, anchor=anchor, decoupled=True, learning_rate=lr)
        return optax.chain(base, pull)
    granularity = "global" if config.regularizer == "selective" else "per_tensor"
    return optax.chain(optax.inject_hyperparams(selective_prox)(lam, anchor=anchor, granularity=granularity), base)


# ------------------------------------------------------------------------------------- model functions
def as_pytree(fn: Callable):
    """``fn`` as a pytree callable (an `AdaptedFunction` or a Partial as it is; other functions leafless)."""
    return fn if isinstance(fn, (Partial, AdaptedFunction)) else Partial(fn)


def _linearized(f, trainable0, trainable, batch):
    return linearize(f, trainable0)(trainable, batch)


def linearized_function(f: Callable, trainable0) -> Partial:
    """f̄(θ, batch) = f(θ0, batch) + J(θ − θ0) of ``f(trainable, batch)`` at θ0 = ``trainable0`` (one jvp per call).
    f is an argument of the returned Partial, so when f is a pytree (an `AdaptedFunction`) its frozen weights, like
    θ0, are leaves that a jit takes as inputs."""
    return Partial(_linearized, f, trainable0)


def model_functions(adapted, output_fn: Callable | None = None) -> tuple[Callable, Partial]:
    """(apply_nonlinear, apply_linearized), each `(trainable, batch) -> logits (B, C)`.

    apply_nonlinear = adapted.as_function(output_fn); apply_linearized(θ) = f(θ0) + J(θ − θ0) at θ0 =
    adapted.trainable. ``output_fn``: the readout (None: the model's head; ``readout.output_fn`` of
    `jaxlin.label_word_readout`: the LM's label-word logits). The frozen weights and θ0 are leaves of the returned
    pytrees (see module doc)."""
    f = adapted.as_function(output_fn)
    return f, linearized_function(f, adapted.trainable)


# ------------------------------------------------------------------------------------------ loss, step
def _per_example_loss(logits_BC, labels_B, loss: str):
    if loss == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
    onehot_BC = jax.nn.one_hot(labels_B, logits_BC.shape[-1], dtype=logits_BC.dtype)
    return 0.5 * jnp.sum((logits_BC - onehot_BC) ** 2, axis=-1)


def over_parts(apply_fn: Callable, trainable, batch):
    """`apply_fn(trainable, batch)`, or for a batch split into parts of similar length (``batch["parts"]``,
    `jaxlin.data.pad_parts`) the outputs of every part, concatenated in the parts' order (the order of the
    batch's labels): one traced call per part, each at its own padded length."""
    outputs = [apply_fn(trainable, part) for part in batch_parts(batch)]
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs)


@dataclasses.dataclass(frozen=True)
class _Loss:
    kind: str

    def __call__(self, apply_fn, trainable, batch):
        logits_BC = over_parts(apply_fn, trainable, batch)
        per_B = _per_example_loss(logits_BC, batch["labels"], self.kind)
        mask_B = batch["example_mask"].astype(per_B.dtype)
        value = jnp.sum(jnp.where(mask_B > 0, per_B, 0.0)) / jnp.maximum(jnp.sum(mask_B), 1.0)
        return value, {"logits": logits_BC, "per_example": per_B}


def make_loss_fn(apply_fn: Callable, loss: str = "cross_entropy") -> Partial:
    """Pure `loss(trainable, batch) -> (mean loss over real examples, {"logits" (B, C), "per_example" (B,)})`.

    `batch` needs input_ids, attention_mask, labels (int class ids) and example_mask (rows with 0 add nothing
    to the value or its gradient)."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    return Partial(_Loss(loss), as_pytree(apply_fn))


@dataclasses.dataclass(frozen=True)
class _TrainStep:
    optimizer: optax.GradientTransformation

    def __call__(self, loss_fn, trainable, opt_state, batch):
        (value, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        fired = [jnp.mean(jnp.stack(jax.tree.leaves(s.fired))) for s in _selective_states(opt_state)]
        if fired:
            metrics["fired"] = jnp.mean(jnp.stack(fired))
        return trainable, opt_state, metrics


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Partial:
    """`step(trainable, opt_state, batch) -> (trainable, opt_state, metrics)`: one optimiser step on the batch's
    loss. metrics: "loss" (before the step), "grad_norm" and, for selective regularisers, "fired" (fraction of
    the Eq. 8 tests that added the pull). Pure and unjitted: jit it once, donating trainable and opt_state
    (`jax.jit(step, donate_argnums=(0, 1))`; `fit` passes the step itself as an argument, see module doc)."""
    return Partial(_TrainStep(optimizer), as_pytree(loss_fn))


def _selective_states(opt_state) -> list:
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SelectiveProxState))
    return [s for s in leaves if isinstance(s, SelectiveProxState)]


def _call(fn, *args):
    return fn(*args)


# The one jit of evaluation, shared by every call: the loss function is an argument, and its static parts
# compare by value, so evaluating the same model again reuses the compiled forward pass.
_forward = jax.jit(_call)
# The one jit of training, likewise shared: a step with the same model and optimiser object reuses the compiled
# program. trainable and opt_state are donated (`fit` passes fresh copies).
_run_step = jax.jit(_call, donate_argnums=(1, 2))


def as_step_batch(batch) -> dict:
    out = {k: batch[k] for k in _STEP_KEYS if k in batch}
    if "example_mask" not in out:
        out["example_mask"] = np.ones(np.shape(batch["labels"])[0], np.float32)
    return out


def batch_arrays(batch) -> dict:
    """Every array of `batch` (what a custom `loss_fn` may read); strings and other host objects stay out."""
    return {k: v for k, v in batch.items() if isinstance(v, (np.ndarray, jax.Array))}


# ------------------------------------------------------------------------------------------ evaluate
def _forward_on(plan: MeshPlan | None, loss_fn: Callable, trainable) -> Callable:
    """forward(batch) -> loss_fn(trainable, batch) through the one jit of evaluation (`_forward`), or on the plan's
    mesh through its jit with explicit shardings (outputs replicated)."""
    if plan is None:
        return lambda batch: _forward(loss_fn, trainable, batch)
    loss_fn, trainable = plan.place(loss_fn), plan.place(trainable)
    jitted = plan.jit(_call, (plan.shardings_like(loss_fn), plan.shardings_like(trainable), plan.rows),
                      plan.replicated)
    return lambda batch: jitted(loss_fn, trainable, plan.batch(batch))


def evaluate(apply_fn: Callable, trainable, batches: Iterable[dict], *, loss: str = "cross_entropy",
             mesh: Mesh | None = None, data_axis: str = "data") -> dict:
    """Mean loss and accuracy over the real examples of `batches`, and their logits (N, C) and labels (N,)
    as numpy, in example order (by the batches' "index", else in order of appearance).

    mesh, data_axis: as in `fit` (each batch split over `data_axis`; with several processes each passes its own
    rows and every process gets the results of all of them)."""
    plan = None if mesh is None else MeshPlan(mesh, data_axis)
    host = np.asarray if plan is None else plan.global_rows
    forward = _forward_on(plan, make_loss_fn(apply_fn, loss), trainable)
    config = _model_config(apply_fn)
    logits, per, labels, index, seen = [], [], [], [], 0
    for batch in batches:
        _check_batch(config, batch, host_only=True)
        step_batch = as_step_batch(batch)
        _, aux = forward(step_batch)
        keep = host(step_batch["example_mask"]) > 0
        idx = host(batch["index"]) if "index" in batch else seen + np.arange(len(keep))  # not a step key
        seen += len(keep)
        logits.append(np.asarray(aux["logits"])[keep])
        per.append(np.asarray(aux["per_example"])[keep])
        labels.append(host(step_batch["labels"])[keep])
        index.append(idx[keep])
    if not logits:
        raise ValueError("evaluate got no batches; pass a non-empty iterable of batches")
    order = np.argsort(np.concatenate(index), kind="stable")
    logits_NC, per_N, labels_N = (np.concatenate(x)[order] for x in (logits, per, labels))
    return {"loss": float(per_N.mean()), "accuracy": float((logits_NC.argmax(-1) == labels_N).mean()),
            "logits": logits_NC, "labels": labels_N}


def _evaluate_loss(loss_fn: Callable, trainable, batches: Iterable[dict], plan: MeshPlan | None = None) -> dict:
    """{"loss": mean of `loss_fn` over `batches` weighted by real examples, "accuracy": None}."""
    forward = _forward_on(plan, loss_fn, trainable)
    host = np.asarray if plan is None else plan.global_rows
    total, weight = 0.0, 0.0
    for batch in batches:
        batch = batch_arrays(batch)
        value, _ = forward(batch)
        w = float(np.sum(host(batch["example_mask"]))) if "example_mask" in batch else \
            float(len(host(jax.tree.leaves(batch)[0])))
        total, weight = total + w * float(value), weight + w
    if weight == 0:
        raise ValueError("eval_batches_fn() yielded no real examples; pass a non-empty iterable of batches")
    return {"loss": total / weight, "accuracy": None}


# ------------------------------------------------------------------------------------------------ fit
@dataclasses.dataclass(frozen=True)
class TrainResult:
    """trainable: final θ_T. train_loss: mean batch loss per step (before that step's update).
    eval_history: per evaluation {"epoch", "step", "loss", "accuracy"}. regularizer_info: for selective
    regularisers {"fired": fraction fired per step}, else {}. wall_time_s: seconds, compiles included.
    resumed_from: the step of the checkpoint this run continued from (0: started from trainable0).
    opt_state: the optimiser state after the last step (on a mesh, sharded like the parameters)."""

    trainable: Any
    train_loss: list
    eval_history: list
    regularizer_info: dict
    wall_time_s: float
    steps: int
    config: TrainConfig
    resumed_from: int = 0
    opt_state: Any = None


# Steps dispatched but not yet finished: `fit` blocks on the loss of the step this many behind the newest, so the
# device always has work queued while the host never runs more than this far ahead (and the progress bar counts
# finished steps).
_IN_FLIGHT = 3


def fit(apply_fn: Callable | None, trainable0, train_batches_fn: Callable[[int], Iterable[dict]], *,
        config: TrainConfig, optimizer: optax.GradientTransformation | None = None,
        eval_batches_fn: Callable[[], Iterable[dict]] | None = None, progress: bool = True,
        callback: Callable[[int, dict], None] | None = None, loss_fn: Callable | None = None,
        mesh: Mesh | None = None, data_axis: str = "data", checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100, checkpoint_key: str = "") -> TrainResult:
    """Train `apply_fn(trainable, batch) -> logits` from `trainable0` (not modified).

    optimizer: a ready optax optimiser used instead of `make_optimizer(config, steps)`; config then gives only the
    loss and the number of steps. Pass the same object to many runs (one schedule for all, as `run_study` does) and
    they share one compiled step.

    loss_fn: `loss_fn(trainable, batch) -> (mean loss, aux dict)` used instead of `make_loss_fn(apply_fn,
    config.loss)` (e.g. a next-token objective). Then every array of a batch reaches the step (not only the
    classification keys), and an evaluation (only with `eval_batches_fn`) records the mean of `loss_fn` over the
    eval batches, weighted by their real examples (`example_mask`, else rows), with accuracy None.

    train_batches_fn(epoch) -> the batches of that epoch (reshuffle deterministically from the epoch number);
    epoch 0 is read once up front to count the steps per epoch for the schedule. eval_batches_fn() -> eval
    batches, evaluated after each epoch (`config.eval_every_epoch`) and at the end. callback(step, metrics)
    gets each step's metrics as floats (this syncs with the device every step).

    mesh, data_axis (docs/scaling.md): train on a `jax.sharding.Mesh`. Each batch's examples are split
    over `data_axis` (with several processes, each process passes its own rows: the global batch is their
    concatenation in process order); the trainable tree keeps the shardings of `trainable0` where they are on the
    mesh (replicated otherwise) and the optimiser state is sharded like it (`jaxlin.train_mesh.MeshPlan`). Without
    a mesh nothing is placed and the numbers are those of one device.

    checkpoint_dir, checkpoint_every, checkpoint_key (docs/scaling.md, "Resuming training"): save the
    training state with Orbax every `checkpoint_every` steps and at the end; a directory that already holds a
    checkpoint of the same run (same config, θ0, model arrays, optimiser layout, first epoch's data and
    `checkpoint_key`) is resumed from its latest step and continues on the same trajectory as an uninterrupted
    run; one of another run is refused. Name runs that share all of those (none do in jaxlin) by `checkpoint_key`.

    Progress: the bar counts finished steps (the host stays at most a few steps ahead of the device) and shows
    the latest loss and evaluation as its postfix.

    The token ids of a jaxlin model's batches (`model_functions`, `Adapted.as_function`) are checked on the host
    (`jaxlin.models.check_inputs`, a DataError naming the bad id or length): all of epoch 0 before the first
    step, later epochs' batches when they are numpy arrays.
    """
    start = time.perf_counter()
    plan = None if mesh is None else MeshPlan(mesh, data_axis)
    if checkpoint_dir is not None:
        _check_int("checkpoint_every", checkpoint_every)
    first_epoch = list(train_batches_fn(0))
    if not first_epoch:
        raise ValueError("train_batches_fn(0) yielded no batches; check the training set and batch_size")
    config_of_model = _model_config(apply_fn)
    for batch in first_epoch:
        _check_batch(config_of_model, batch, host_only=False)
    total = config.total_steps(len(first_epoch))
    optimizer = make_optimizer(config, total) if optimizer is None else optimizer
    custom_loss = loss_fn is not None
    to_step = batch_arrays if custom_loss else as_step_batch
    loss_fn = as_pytree(loss_fn) if custom_loss else None
    if plan is not None:  # every array the step reads goes onto the mesh once, here
        loss_fn = plan.place(loss_fn) if custom_loss else None
        apply_fn = None if apply_fn is None else plan.place(as_pytree(apply_fn))
    loss_fn = make_loss_fn(apply_fn, config.loss) if loss_fn is None else loss_fn
    step = make_train_step(loss_fn, optimizer)
    trainable, opt_state, run_step, place_batch = _initial_state(plan, step, trainable0, optimizer)

    losses, fired, history, done, epoch, skip = [], [], [], 0, 0, 0
    checkpoint = None
    if checkpoint_dir is not None:
        key = run_key(config, total_steps=total, trainable0=trainable0, step_fn=step, opt_state=opt_state,
                      first_epoch=[to_step(b) for b in first_epoch], checkpoint_key=checkpoint_key)
        checkpoint = TrainCheckpoint(checkpoint_dir, key)
        restored = checkpoint.restore(trainable, opt_state)
        if restored is not None:
            trainable, opt_state, meta = restored
            losses, fired, history = meta["train_loss"], meta["fired"], meta["eval_history"]
            done, epoch, skip = meta["step"], meta["epoch"], meta["position"]
    resumed_from = done

    def save(position):
        checkpoint.save(done, trainable, opt_state, {
            "step": done, "epoch": epoch, "position": position, "train_loss": json_floats(losses),
            "fired": json_floats(fired), "eval_history": history})

    def run_eval(epoch, done):
        bar.set_postfix_str(f"loss={float(losses[-1]):.4g} epoch={epoch} evaluating", refresh=True)
        ev = (_evaluate_loss(loss_fn, trainable, eval_batches_fn(), plan) if custom_loss else
              evaluate(apply_fn, trainable, eval_batches_fn(), loss=config.loss, mesh=mesh, data_axis=data_axis))
        history.append({"epoch": epoch, "step": done, "loss": ev["loss"], "accuracy": ev["accuracy"]})
        bar.set_postfix_str(f"loss={float(losses[-1]):.4g} epoch={epoch} eval_loss={ev['loss']:.4g}"
                            + ("" if ev["accuracy"] is None else f" eval_acc={ev['accuracy']:.3g}"))

    bar = _progress_bar(total, progress, initial=done)
    in_flight = collections.deque()

    def finish(keep: int):
        while len(in_flight) > keep:
            in_flight.popleft().block_until_ready()
            bar.update(1)

    try:
        while done < total:
            seen = 0
            for batch in first_epoch if epoch == 0 else train_batches_fn(epoch):
                seen += 1
                if seen <= skip:  # resumed: these batches were trained on before the checkpoint
                    continue
                if epoch > 0:
                    _check_batch(config_of_model, batch, host_only=True)
                trainable, opt_state, metrics = run_step(step, trainable, opt_state, place_batch(to_step(batch)))
                losses.append(metrics["loss"])
                fired.append(metrics.get("fired"))
                done += 1
                in_flight.append(metrics["loss"])
                finish(_IN_FLIGHT)
                if checkpoint is not None and done % checkpoint_every == 0 and done < total:
                    finish(0)
                    save(seen)
                if callback is not None:
                    callback(done, {k: float(v) for k, v in metrics.items()})
                if done == total:
                    break
            if seen == 0:
                raise ValueError(f"train_batches_fn({epoch}) yielded no batches; every epoch must yield some")
            skip = 0
            epoch += 1
            finish(0)
            bar.set_postfix_str(f"loss={float(losses[-1]):.4g} epoch={epoch}")
            if eval_batches_fn is not None and config.eval_every_epoch and done < total:
                run_eval(epoch, done)
        finish(0)
        if checkpoint is not None and done > resumed_from:
            save(0)
        if eval_batches_fn is not None:
            run_eval(epoch, done)
    finally:
        bar.close()
        if checkpoint is not None:
            checkpoint.close()
    info = {"fired": json_floats(fired)} if fired and fired[0] is not None else {}
    return TrainResult(trainable, json_floats(losses), history, info, time.perf_counter() - start, done, config,
                       resumed_from, opt_state)


def _initial_state(plan: MeshPlan | None, step, trainable0, optimizer):
    """(trainable, opt_state, run_step, place_batch) of a fresh run: copies of trainable0 and of the optimiser's
    initial state (both are donated to the step, and an "init" anchor or adamspd's shared zeros must not alias),
    on the plan's mesh with their shardings when there is one, and the jitted step that keeps them there."""
    if plan is None:
        return (jax.tree.map(jnp.copy, trainable0), jax.tree.map(jnp.copy, optimizer.init(trainable0)),
                _run_step, lambda batch: batch)
    t_shardings = plan.shardings_like(trainable0)
    trainable = jax.device_put(jax.tree.map(jnp.copy, trainable0), t_shardings)
    o_shardings = plan.opt_state_shardings(jax.eval_shape(optimizer.init, trainable), trainable, t_shardings)
    opt_state = jax.device_put(jax.tree.map(jnp.copy, optimizer.init(trainable)), o_shardings)
    step_shardings = plan.shardings_like(step)
    run_step = plan.jit(_call, (step_shardings, t_shardings, o_shardings, plan.rows),
                        (t_shardings, o_shardings, plan.replicated), donate_argnums=(1, 2))
    return trainable, opt_state, run_step, plan.batch


def _model_config(apply_fn: Callable):
    """The transformers config of the jaxlin model behind `apply_fn` (an `AdaptedFunction` or a Partial holding
    one, as `model_functions` returns), or None for other callables, whose inputs are then not checked."""
    fns = (apply_fn.func, *apply_fn.args) if isinstance(apply_fn, Partial) else (apply_fn,)
    f = next((f for f in fns if isinstance(f, AdaptedFunction)), None)
    return None if f is None else f.adapted.model.config


def _check_batch(config, batch, *, host_only: bool) -> None:
    """`check_inputs` on a batch before the jitted step sees it (inside, the ids are tracers). `host_only`
    skips ids already on a device, so later epochs add no device sync per step; the first epoch is checked
    whole before training starts."""
    if config is None:
        return
    for part in batch_parts(batch):
        if not (host_only and isinstance(part["input_ids"], jax.Array)):
            check_inputs(config, part["input_ids"], part["attention_mask"])


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="fit", unit="step", leave=False)
