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
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from .adapters import AdaptedFunction
from .linearize import linearize
from .models.base import check_inputs
from .regularizers import SelectiveProxState, adamspd, prox_l2, selective_prox

SCHEDULES = ("linear", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cross_entropy", "squared")
REGULARIZERS = ("none", "prox", "prox_decoupled", "selective", "selective_per_tensor", "adamspd")
ANCHORS = ("init", "zero")
_STEP_KEYS = ("input_ids", "attention_mask", "labels", "example_mask")


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
def _as_pytree(fn: Callable):
    """``fn`` as a pytree callable (an `AdaptedFunction` or a Partial as it is; other functions leafless)."""
    return fn if isinstance(fn, (Partial, AdaptedFunction)) else Partial(fn)


def _linearized(f, trainable0, trainable, batch):
    return linearize(f, trainable0)(trainable, batch)


def model_functions(adapted) -> tuple[Callable, Partial]:
    """(apply_nonlinear, apply_linearized), each `(trainable, batch) -> logits (B, C)`.

    apply_nonlinear = adapted.as_function(); apply_linearized(θ) = f(θ0) + J(θ − θ0) at θ0 = adapted.trainable.
    The frozen weights and θ0 are leaves of the returned pytrees (see module doc)."""
    f = adapted.as_function()
    return f, Partial(_linearized, f, adapted.trainable)


# ------------------------------------------------------------------------------------------ loss, step
def _per_example_loss(logits_BC, labels_B, loss: str):
    if loss == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
    onehot_BC = jax.nn.one_hot(labels_B, logits_BC.shape[-1], dtype=logits_BC.dtype)
    return 0.5 * jnp.sum((logits_BC - onehot_BC) ** 2, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Loss:
    kind: str

    def __call__(self, apply_fn, trainable, batch):
        logits_BC = apply_fn(trainable, batch)
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
    return Partial(_Loss(loss), _as_pytree(apply_fn))


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
    return Partial(_TrainStep(optimizer), _as_pytree(loss_fn))


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


def _step_batch(batch) -> dict:
    out = {k: batch[k] for k in _STEP_KEYS if k in batch}
    if "example_mask" not in out:
        out["example_mask"] = np.ones(np.shape(batch["labels"])[0], np.float32)
    return out


def _array_batch(batch) -> dict:
    """Every array of `batch` (what a custom `loss_fn` may read); strings and other host objects stay out."""
    return {k: v for k, v in batch.items() if isinstance(v, (np.ndarray, jax.Array))}


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(apply_fn: Callable, trainable, batches: Iterable[dict], *, loss: str = "cross_entropy") -> dict:
    """Mean loss and accuracy over the real examples of `batches`, and their logits (N, C) and labels (N,)
    as numpy, in example order (by the batches' "index", else in order of appearance)."""
    loss_fn = make_loss_fn(apply_fn, loss)
    config = _model_config(apply_fn)
    logits, per, labels, index, seen = [], [], [], [], 0
    for batch in batches:
        _check_batch(config, batch, host_only=True)
        batch = _step_batch(batch)
        _, aux = _forward(loss_fn, trainable, batch)
        keep = np.asarray(batch["example_mask"]) > 0
        idx = np.asarray(batch["index"]) if "index" in batch else seen + np.arange(len(keep))
        seen += len(keep)
        logits.append(np.asarray(aux["logits"])[keep])
        per.append(np.asarray(aux["per_example"])[keep])
        labels.append(np.asarray(batch["labels"])[keep])
        index.append(idx[keep])
    if not logits:
        raise ValueError("evaluate got no batches; pass a non-empty iterable of batches")
    order = np.argsort(np.concatenate(index), kind="stable")
    logits_NC, per_N, labels_N = (np.concatenate(x)[order] for x in (logits, per, labels))
    return {"loss": float(per_N.mean()), "accuracy": float((logits_NC.argmax(-1) == labels_N).mean()),
            "logits": logits_NC, "labels": labels_N}


def _evaluate_loss(loss_fn: Callable, trainable, batches: Iterable[dict]) -> dict:
    """{"loss": mean of `loss_fn` over `batches` weighted by real examples, "accuracy": None}."""
    total, weight = 0.0, 0.0
    for batch in batches:
        batch = _array_batch(batch)
        value, _ = _forward(loss_fn, trainable, batch)
        w = float(np.sum(batch["example_mask"])) if "example_mask" in batch else \
            float(np.shape(jax.tree.leaves(batch)[0])[0])
        total, weight = total + w * float(value), weight + w
    if weight == 0:
        raise ValueError("eval_batches_fn() yielded no real examples; pass a non-empty iterable of batches")
    return {"loss": total / weight, "accuracy": None}


# ------------------------------------------------------------------------------------------------ fit
@dataclasses.dataclass(frozen=True)
class TrainResult:
    """trainable: final θ_T. train_loss: mean batch loss per step (before that step's update).
    eval_history: per evaluation {"epoch", "step", "loss", "accuracy"}. regularizer_info: for selective
    regularisers {"fired": fraction fired per step}, else {}. wall_time_s: seconds, compiles included."""

    trainable: Any
    train_loss: list
    eval_history: list
    regularizer_info: dict
    wall_time_s: float
    steps: int
    config: TrainConfig


def fit(apply_fn: Callable, trainable0, train_batches_fn: Callable[[int], Iterable[dict]], *,
        config: TrainConfig, optimizer: optax.GradientTransformation | None = None,
        eval_batches_fn: Callable[[], Iterable[dict]] | None = None, progress: bool = True,
        callback: Callable[[int, dict], None] | None = None, loss_fn: Callable | None = None) -> TrainResult:
    """Train `apply_fn(trainable, batch) -> logits` from `trainable0` (not modified).

    loss_fn: `loss_fn(trainable, batch) -> (mean loss, aux dict)` used instead of `make_loss_fn(apply_fn,
    config.loss)` (e.g. a next-token objective). Then every array of a batch reaches the step (not only the
    classification keys), and an evaluation (only with `eval_batches_fn`) records the mean of `loss_fn` over the
    eval batches, weighted by their real examples (`example_mask`, else rows), with accuracy None.

    optimizer: a ready optax optimiser used instead of `make_optimizer(config, steps)`; config then gives only the
    loss and the number of steps. Pass the same object to many runs (one schedule for all, as `run_study` does) and
    they share one compiled step.

    train_batches_fn(epoch) -> the batches of that epoch (reshuffle deterministically from the epoch number);
    epoch 0 is read once up front to count the steps per epoch for the schedule. eval_batches_fn() -> eval
    batches, evaluated after each epoch (`config.eval_every_epoch`) and at the end. callback(step, metrics)
    gets each step's metrics as floats (this syncs with the device every step).

    The token ids of a jaxlin model's batches (`model_functions`, `Adapted.as_function`) are checked on the host
    (`jaxlin.models.check_inputs`, a DataError naming the bad id or length): all of epoch 0 before the first
    step, later epochs' batches when they are numpy arrays.
    """
    start = time.perf_counter()
    first_epoch = list(train_batches_fn(0))
    if not first_epoch:
        raise ValueError("train_batches_fn(0) yielded no batches; check the training set and batch_size")
    config_of_model = _model_config(apply_fn)
    for batch in first_epoch:
        _check_batch(config_of_model, batch, host_only=False)
    total = config.total_steps(len(first_epoch))
    optimizer = make_optimizer(config, total) if optimizer is None else optimizer
    custom_loss = loss_fn is not None
    loss_fn = make_loss_fn(apply_fn, config.loss) if loss_fn is None else _as_pytree(loss_fn)
    to_step = _array_batch if custom_loss else _step_batch
    step = make_train_step(loss_fn, optimizer)
    # `step` is an argument of `_run_step`, so the arrays it carries are inputs, not constants; trainable and
    # opt_state are donated, so both are fresh copies: trainable0 survives, and no buffer appears twice (an "init"
    # anchor is trainable0 itself; adamspd's init shares one zeros tree between mu and nu).
    trainable = jax.tree.map(jnp.copy, trainable0)
    opt_state = jax.tree.map(jnp.copy, optimizer.init(trainable0))

    def run_eval(epoch, done):
        ev = (_evaluate_loss(loss_fn, trainable, eval_batches_fn()) if custom_loss else
              evaluate(apply_fn, trainable, eval_batches_fn(), loss=config.loss))
        history.append({"epoch": epoch, "step": done, "loss": ev["loss"], "accuracy": ev["accuracy"]})

    losses, fired, history, done, epoch = [], [], [], 0, 0
    bar = _progress_bar(total, progress)
    while done < total:
        before = done
        for batch in first_epoch if epoch == 0 else train_batches_fn(epoch):
            if epoch > 0:
                _check_batch(config_of_model, batch, host_only=True)
            trainable, opt_state, metrics = _run_step(step, trainable, opt_state, to_step(batch))
            losses.append(metrics["loss"])
            fired.append(metrics.get("fired"))
            done += 1
            bar.update(1)
            if callback is not None:
                callback(done, {k: float(v) for k, v in metrics.items()})
            if done == total:
                break
        if done == before:
            raise ValueError(f"train_batches_fn({epoch}) yielded no batches; every epoch must yield some")
        epoch += 1
        bar.set_postfix(loss=f"{float(losses[-1]):.4g}", epoch=epoch)
        if eval_batches_fn is not None and config.eval_every_epoch and done < total:
            run_eval(epoch, done)
    bar.close()
    if eval_batches_fn is not None:
        run_eval(epoch, done)
    info = {"fired": [float(f) for f in jax.device_get(fired)]} if fired and fired[0] is not None else {}
    return TrainResult(trainable, [float(v) for v in jax.device_get(losses)], history, info,
                       time.perf_counter() - start, done, config)


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
    if config is None or (host_only and isinstance(batch["input_ids"], jax.Array)):
        return
    check_inputs(config, batch["input_ids"], batch["attention_mask"])


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="fit", unit="step", leave=False)
