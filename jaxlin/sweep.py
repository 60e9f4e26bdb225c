"""The λ sweep: how far regularised fine-tuning moves, and how close it stays to its linearization
(docs/paper.md §4.4, §7.1).

For each λ, `lambda_sweep` trains the nonlinear model f and the linearized model f̄ = f(θ0) + J(θ − θ0) from the
same θ0 on the same batches with the same optimiser, and records distances in parameter space (θ_T vs θ0, θ_T vs
θ̄_T), in function space (logits of f vs f̄), per-module relative weight changes and the Theorem 2 radius.
`sweep_summary` fits log-log slopes against λ (the candidates of §4.4 predict λ^{-1/2} for the distance to
init and ~λ^{-3/2} for nonlinear vs linearized).

What is trained and compared is an objective: classification through the model's head or a label-word readout
(`ClassificationObjective`, the default; ``output_fn=``), or next-token fine-tuning on (prompt, completion)
pairs (`jaxlin.next_token.NextTokenObjective`); one loop serves both (docs/decoders.md).

On a device mesh (``mesh=``, docs/scaling.md) every fit and evaluation runs through `jaxlin.train.fit` /
`evaluate` with the batch over the data axis and the parameters kept on their shardings; with several processes
each process feeds its own share of every batch and every process gets the same results.

Normalisation. Training minimises mean_i ℓ_i + (λ/2)‖θ − θ0‖² (a mean over the N training examples). The paper
writes R̃ = Σ_i ℓ_i + (λ̃/2)‖θ − θ0‖², so R̃ = N·mean and λ̃ = N·λ. Its candidate Theorem 2 radius
√(2R̃(θ0)/λ̃) is then √(2·mean_i ℓ_i(θ0)/λ): that is `theorem2_radius`. It bounds ‖θ_t − θ0‖ for gradient
flow with the coupled pull; for Adam, mini-batches or other regularisers it is a reference scale only.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from . import data
from .distributed import process_rows, to_host
from ._util import loglog_slope
from .readout import check_readout
from .prefix import frozen_prefix as prefix_of
from .train import TrainConfig, evaluate, fit, linearized_function, model_functions
from .train_checkpoint import fit_checkpointing
from .train_mesh import MeshPlan

DISTANCE_KEYS = ("theta_distance_to_init", "theta_distance_to_init_linearized", "theta_distance_lin_nonlin",
                 "output_distance_lin_nonlin_train", "output_distance_lin_nonlin_eval", "kl_nonlin_lin")


@dataclasses.dataclass(frozen=True)
class ClassificationObjective:
    """What the sweep trains and compares for classification: logits (B, C) of ``output_fn`` (None: the model's own
    head; ``readout.output_fn`` of `jaxlin.label_word_readout`: the LM's label-word logits, with ``tokenizer`` the
    readout itself, so texts become prompts). The loss is `TrainConfig.loss` over the C logits.

    An objective has ``name``, ``functions(adapted) -> (f, f̄)``, ``batches(dataset, tokenizer, config, shuffle,
    seed)``, ``loss_fn(apply_fn)`` (None: `fit`'s own `config.loss`), ``evaluate(apply_fn, trainable, batches,
    config) -> {"loss", "accuracy", "outputs"}`` (optionally with keywords ``mesh``, ``data_axis``: then it runs on
    a mesh, each process passing its own rows), ``compare(outputs, outputs_bar) -> {"rms_distance", "kl",
    "agreement"}`` and, for `jaxlin.study.run_study`, ``study_functions(tokenizer, output_fn) -> (gated,
    readout_logits)``; `jaxlin.next_token.NextTokenObjective` is the other one."""

    output_fn: Callable | None = None
    name: str = "classification"

    def functions(self, adapted) -> tuple[Callable, Callable]:
        return model_functions(adapted, self.output_fn)

    def batches(self, dataset, tokenizer, config: TrainConfig, *, shuffle: bool, seed: int):
        return data.batches(dataset, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
                            shuffle=shuffle, seed=seed, padding_side=getattr(tokenizer, "padding_side", "right"),
                            pad_to_multiple_of=config.pad_to_multiple_of)

    def loss_fn(self, apply_fn):
        return None

    def evaluate(self, apply_fn, trainable, batches, config: TrainConfig, *, mesh: Mesh | None = None,
                 data_axis: str = "data") -> dict:
        found = evaluate(apply_fn, trainable, batches, loss=config.loss, mesh=mesh, data_axis=data_axis)
        return {"loss": found["loss"], "accuracy": found["accuracy"], "outputs": found["logits"]}

    def compare(self, f_NC, f_bar_NC) -> dict:
        return output_comparison(f_NC, f_bar_NC)

    def study_functions(self, tokenizer, output_fn) -> tuple[Callable, Callable]:
        """What the κ study trains and reads (`jaxlin.study.run_study`): ``gated(adapted, gate_M)``, the model
        function in which LoRA module i trains iff gate_M[i] = 1, and ``readout_logits(found)``, the (N, C) readout
        logits in `evaluate`'s result. Refused unless this objective reads the study's readout ``output_fn``."""
        if self.output_fn != output_fn:
            raise ValueError(f"run_study(objective=ClassificationObjective({self.output_fn!r})) reads other "
                             f"logits than output_fn={output_fn!r}; pass objective=None to train the study's readout")
        return (lambda adapted, gate_M: adapted.as_function(self.output_fn, gate=gate_M)), \
            (lambda found: found["outputs"])


def lambda_sweep(adapted, train_data, eval_data, tokenizer, *, lambdas: Sequence[float], config: TrainConfig,
                 regularizer: str = "prox", num_train_evaluated: int | None = None, progress: bool = True,
                 output_fn: Callable | None = None, objective=None, mesh: Mesh | None = None,
                 data_axis: str = "data", frozen_prefix: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100, checkpoint_key: str = "",
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Train f and f̄ at each λ in `lambdas` and compare them; one JSON-serialisable dict per λ.

    `config` gives everything but the pull: its `regularizer` and `strength` are replaced by `regularizer`
    and each λ. Batches: `jaxlin.data.batches` with `config.batch_size`/`max_length`, shuffled per epoch from
    `config.seed` (identical for both models), padding on `tokenizer.padding_side` (default right).
    `num_train_evaluated`: the training-set quantities (train loss at θ_T, output distance, KL and agreement on
    training data, the loss at θ0 behind the radius) are measured on the first `num_train_evaluated` training
    examples (None: all of them); each evaluation is a forward pass per model and λ, so on a large training set
    a fixed subset saves most of the sweep's non-training time.

    `output_fn`: the readout (None: the model's head). For label words pass ``tokenizer=readout,
    output_fn=readout.output_fn`` (model loaded with task="causal_lm"). `objective`: what is trained and
    compared, `ClassificationObjective(output_fn)` by default; `jaxlin.next_token.NextTokenObjective()` trains
    the causal-LM loss on completion tokens of (prompt, completion) data instead (`output_fn` must then be None).

    `mesh`, `data_axis` (docs/scaling.md): run every fit and evaluation on a `jax.sharding.Mesh`, each batch split
    over `data_axis` and the trainable (and frozen) leaves kept on the shardings they come with when they live on
    the mesh (e.g. `jaxlin.sharding.shard_adapted`), replicated otherwise. With several processes every process
    passes the same data sets and keeps its own equal share of each batch's rows (so `config.batch_size` must be
    a multiple of the number of processes and of the data axis's size); every process returns the same results,
    equal to one device's up to float rounding. An objective whose ``evaluate`` takes no ``mesh`` is evaluated
    with its parameters where they are, on the whole batches: in one process only.
    `frozen_prefix`: when nothing below block k trains, compute blocks 0 … k−1 once per example and train and
    evaluate from block k (`jaxlin.prefix`; the same results up to float rounding). Without a mesh, for the
    classification objective; the block it starts from is the result's "prefix_start_layer" (0: none).

    `checkpoint_dir`, `checkpoint_every`, `checkpoint_key` (docs/scaling.md, "Resuming training"): each fit
    checkpoints its training state every `checkpoint_every` steps and at its end in ``<checkpoint_dir>/<i>-<kind>``
    (i the index of λ in `lambdas`, kind nonlinear or linearized; `jaxlin.train.fit`), so calling the sweep again
    with the same arguments reads back the fits that finished and continues the interrupted one from its last
    checkpoint, on the same trajectory; a checkpoint of other inputs is refused. `log(line)` gets one line per fit
    that did not start from θ0 (None: no lines).

    Keys per λ (norms are Euclidean over all trainable leaves; f, f̄ are logits (N, C), or for the next-token
    objective the next-token logits (T, V) at the T completion tokens, where "accuracy" is the fraction of greedy
    tokens equal to the completion's and the KL and agreement are per token):
      lambda, regularizer, anchor, objective, variant {loss, regularizer, anchor, optimizer, schedule,
        learning_rate, epochs, steps, batch_size, seed}
      theta_distance_to_init ‖θ_T − θ0‖, theta_distance_to_init_linearized ‖θ̄_T − θ0‖,
      theta_distance_lin_nonlin ‖θ_T − θ̄_T‖
      output_distance_lin_nonlin_train / _eval: √(mean_i ‖f(x_i) − f̄(x_i)‖²), the RMS over examples of the
        per-example logit distance, on the training / eval set
      kl_nonlin_lin, agreement: mean_i KL(softmax f(x_i) ‖ softmax f̄(x_i)) and the fraction of equal argmax,
        on the eval set; kl_nonlin_lin_train, agreement_train the same on the training set
      eval_accuracy_nonlinear / _linearized, eval_loss_nonlinear / _linearized
      train_loss_nonlinear / _linearized: mean loss over the evaluated training examples at θ_T (not the last
        batch); num_train_evaluated: how many (the first of the training set)
      loss_curve_nonlinear / _linearized: mean batch loss per step
      init_train_loss_mean mean_i ℓ_i(θ0) over the evaluated examples; init_train_loss_sum R̃(θ0) = N·mean;
        num_train N (all the training examples)
      theorem2_radius √(2·init_train_loss_mean/λ) (module doc; None at λ = 0)
      relative_module_distances {"nonlinear", "linearized"}: {module: ‖ΔW‖_F/‖W0‖_F}, with ΔW = s(A_T B_T −
        A0 B0) for a LoRA module (s = alpha/rank; = ‖BA‖_F/‖W0‖_F of §7.1 when B0 = 0 and s = 1), and the
        change of all the module's leaves relative to their init norm for a module trained in full (a head)
      prefix_start_layer: the block training started from (`frozen_prefix`; 0: the whole model)
      wall_time_s: both runs and their evaluations, compiles included.
    """
    lambdas = [float(lam) for lam in lambdas]
    bad = [lam for lam in lambdas if not (math.isfinite(lam) and lam >= 0)]
    if not lambdas or bad:
        raise ValueError(f"lambdas={lambdas} must be a non-empty list of finite values ≥ 0; bad: {bad}")
    if objective is None:
        check_readout(tokenizer, output_fn, getattr(train_data, "num_classes", None))
        objective = ClassificationObjective(output_fn)
    elif output_fn is not None:
        raise ValueError(f"lambda_sweep got output_fn={output_fn!r} and objective={objective!r}; the objective "
                         "holds its readout: pass one of them")

    plan = None if mesh is None else MeshPlan(mesh, data_axis)
    evaluate_on_mesh = plan is not None and "mesh" in inspect.signature(objective.evaluate).parameters
    if plan is not None and not evaluate_on_mesh and jax.process_count() > 1:
        raise ValueError(f"the objective {objective.name!r} evaluates on one process only (its evaluate takes no "
                         f"mesh); run this sweep in one process, or with objective {ClassificationObjective.name!r}")
    fit_kw = {} if plan is None else {"mesh": mesh, "data_axis": data_axis}
    eval_kw = fit_kw if evaluate_on_mesh else {}

    apply_nonlinear, apply_linearized = objective.functions(adapted)
    longest = data.round_up(config.max_length, config.pad_to_multiple_of)  # the longest padded batch
    prefix = prefix_of(apply_nonlinear, adapted.trainable, length=longest) if frozen_prefix and plan is None else None
    if prefix is not None:  # both models from the prefix's block on, f̄ linearized at the same θ0
        apply_nonlinear = prefix.function
        apply_linearized = linearized_function(prefix.function, adapted.trainable)

    def batches_of(dataset, shuffle, seed, own_rows):
        found = objective.batches(dataset, tokenizer, config, shuffle=shuffle, seed=seed)
        if prefix is not None:
            found = map(prefix.attach, found)
        return map(functools.partial(process_rows, fix="the batch size"), found) if own_rows else found

    def train_batches(epoch):
        return batches_of(train_data, True, config.seed * 100_003 + epoch, plan is not None)

    def eval_batches():
        return batches_of(eval_data, False, 0, evaluate_on_mesh)

    n_train = len(train_data)
    n_evaluated = n_train if num_train_evaluated is None else int(num_train_evaluated)
    if not 1 <= n_evaluated <= n_train:
        raise ValueError(f"num_train_evaluated={num_train_evaluated} must be in [1, {n_train}] (the training set "
                         "size) or None for all of it")
    train_evaluated = train_data if n_evaluated == n_train else train_data.subset(np.arange(n_evaluated))

    def train_eval_batches():
        return batches_of(train_evaluated, False, 0, evaluate_on_mesh)

    theta0 = adapted.trainable if plan is None else plan.place(adapted.trainable)
    init = objective.evaluate(apply_nonlinear, theta0, train_eval_batches(), config, **eval_kw)
    theta0_host = to_host(theta0)
    results = []
    for i, lam in enumerate(lambdas):
        start = time.perf_counter()
        cfg = dataclasses.replace(config, regularizer=regularizer, strength=lam)
        runs = {}
        for name, apply_fn in (("nonlinear", apply_nonlinear), ("linearized", apply_linearized)):
            res = fit(apply_fn, theta0, train_batches, config=cfg, progress=progress,
                      loss_fn=objective.loss_fn(apply_fn), **fit_kw,
                      **fit_checkpointing(checkpoint_dir, f"{i}-{name}", checkpoint_every, checkpoint_key))
            if res.resumed_from and log is not None:
                log(f"sweep: λ={lam:g} {name}: " + ("finished before the interruption, read back from its checkpoint"
                                                   if res.resumed_from == res.steps else
                                                   f"resumed at step {res.resumed_from} of {res.steps}"))
            runs[name] = {"result": res, "trainable": to_host(res.trainable),
                          "train": objective.evaluate(apply_fn, res.trainable, train_eval_batches(), cfg, **eval_kw),
                          "eval": objective.evaluate(apply_fn, res.trainable, eval_batches(), cfg, **eval_kw)}
        theta, theta_lin = runs["nonlinear"]["trainable"], runs["linearized"]["trainable"]
        out_train = objective.compare(runs["nonlinear"]["train"]["outputs"], runs["linearized"]["train"]["outputs"])
        out_eval = objective.compare(runs["nonlinear"]["eval"]["outputs"], runs["linearized"]["eval"]["outputs"])
        results.append({
            "lambda": lam, "regularizer": regularizer, "anchor": cfg.anchor, "objective": objective.name,
            "variant": _variant(cfg),
            "theta_distance_to_init": _distance(theta, theta0_host),
            "theta_distance_to_init_linearized": _distance(theta_lin, theta0_host),
            "theta_distance_lin_nonlin": _distance(theta, theta_lin),
            "output_distance_lin_nonlin_train": out_train["rms_distance"],
            "output_distance_lin_nonlin_eval": out_eval["rms_distance"],
            "kl_nonlin_lin": out_eval["kl"], "agreement": out_eval["agreement"],
            "kl_nonlin_lin_train": out_train["kl"], "agreement_train": out_train["agreement"],
            **{f"{split}_{metric}_{name}": runs[name][split][metric]
               for name in runs for split, metric in (("eval", "accuracy"), ("eval", "loss"), ("train", "loss"))},
            **{f"loss_curve_{name}": runs[name]["result"].train_loss for name in runs},
            "init_train_loss_mean": init["loss"], "init_train_loss_sum": n_train * init["loss"],
            "num_train": n_train, "num_train_evaluated": n_evaluated,
            "theorem2_radius": math.sqrt(2.0 * init["loss"] / lam) if lam > 0 else None,
            "relative_module_distances": {name: relative_module_distances(adapted, runs[name]["trainable"])
                                          for name in runs},
            "prefix_start_layer": 0 if prefix is None else prefix.start_layer,
            "wall_time_s": time.perf_counter() - start,
        })
    return results


def _variant(cfg: TrainConfig) -> dict:
    keys = ("loss", "regularizer", "anchor", "optimizer", "schedule", "learning_rate", "epochs", "steps",
            "batch_size", "seed")
    return {k: getattr(cfg, k) for k in keys}


def _distance(a, b) -> float:
    sq = jax.tree.map(lambda x, y: np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2), a, b)
    return float(np.sqrt(sum(jax.tree.leaves(sq))))


def output_comparison(f_NC: np.ndarray, f_bar_NC: np.ndarray) -> dict:
    """RMS over rows of ‖f − f̄‖₂, mean KL(softmax f ‖ softmax f̄), fraction of equal argmax; rows are examples
    (classification) or completion tokens (next-token logits, C = V)."""
    f_NC, f_bar_NC = np.asarray(f_NC, np.float64), np.asarray(f_bar_NC, np.float64)
    logp_NC = f_NC - _logsumexp(f_NC)
    logq_NC = f_bar_NC - _logsumexp(f_bar_NC)
    kl_N = np.sum(np.exp(logp_NC) * (logp_NC - logq_NC), axis=-1)
    return {"rms_distance": float(np.sqrt(np.mean(np.sum((f_NC - f_bar_NC) ** 2, axis=-1)))),
            "kl": float(np.mean(kl_N)),
            "agreement": float(np.mean(f_NC.argmax(-1) == f_bar_NC.argmax(-1)))}


def _logsumexp(x_NC: np.ndarray) -> np.ndarray:
    m = x_NC.max(-1, keepdims=True)
    return m + np.log(np.sum(np.exp(x_NC - m), axis=-1, keepdims=True))


def relative_module_distances(adapted, trainable) -> dict[str, float]:
    """{module: ‖ΔW‖_F/‖W0‖_F} for every trainable group of `adapted` (see `lambda_sweep`)."""
    frozen = traverse_util.flatten_dict(adapted.frozen)
    now, start = (traverse_util.flatten_dict(to_host(t)) for t in (trainable, adapted.trainable))
    out = {}
    for module, paths in adapted.groups.items():
        if module in adapted.lora_modules:
            a, b, a0, b0 = (np.asarray(t[("lora", module, k)], np.float64) for t in (now, start) for k in "ab")
            delta = adapted.lora_scale * (a @ b - a0 @ b0)
            w0 = np.asarray(to_host(frozen[adapted.model.module(module).path + ("kernel",)]), np.float64)
            out[module] = float(np.linalg.norm(delta) / np.linalg.norm(w0))
        else:
            diff = sum(float(np.sum((np.asarray(now[p], np.float64) - np.asarray(start[p], np.float64)) ** 2))
                       for p in paths)
            norm = sum(float(np.sum(np.asarray(start[p], np.float64) ** 2)) for p in paths)
            out[module] = math.sqrt(diff / norm) if norm > 0 else math.inf
    return out


def sweep_summary(results: Sequence[dict]) -> dict:
    """Log-log slopes against λ of each distance in `DISTANCE_KEYS`, next to the Theorem 2 radius's slope
    (−0.5 by construction) and the variant; JSON-serialisable."""
    if not results:
        raise ValueError("sweep_summary got no results; pass the list returned by lambda_sweep")
    lambdas = [r["lambda"] for r in results]
    return {"lambdas": lambdas, "variant": results[0]["variant"],
            "slopes": {key: loglog_slope(lambdas, [r[key] for r in results]) for key in DISTANCE_KEYS},
            "theorem2_radius_slope": loglog_slope(lambdas, [r["theorem2_radius"] for r in results])}
