"""One nonlinear LoRA training step vs one linearized (jvp) step at the same batch (issue 7: ≤ 1.5×).

Both steps are our own minimal jitted optax steps (not jaxlin.train): value_and_grad of the mean
cross-entropy of the logits, then ``optax.adam(1e-3)``. Trainable: LoRA r=8 on every query/key/value plus
the classification head (as the paper trains it). Nonlinear: logits = ``adapted.apply(θ, frozen, ...)``;
linearized: logits = ``jaxlin.linearize(apply, θ0)(θ, frozen, ...)`` = f(θ0) + J(θ − θ0), one jvp per step,
differentiated in reverse mode. θ0 and the frozen base are jit arguments (no baked constants).
Check before timing: at θ = θ0 both give the same loss and gradients (relative error printed).

Two more cases guard against regressions of the training path itself (issue 16):
- ``floor``: one forward and one backward of the same batch and loss, gradients for the trainable leaves only
  (base weights frozen), no optimiser: what any LoRA step must at least cost.
- ``fit``: the step `jaxlin.train.fit` runs (`make_train_step(make_loss_fn(model_functions(adapted)[0]), adam)`,
  masked mean loss, metrics); `fit_over_floor` in the summary should stay near 1.
"""
from __future__ import annotations

from . import _harness as H
from . import _setups as S


def cases(size: str) -> list[dict]:
    spec = {"smoke": ("roberta-tiny", 8, 16), "cpu": ("minilm", 16, 48), "gpu": ("roberta-base", 16, 128)}[size]
    model, batch, length = spec
    return [dict(name=f"{kind}-step-B{batch}-L{length}", priority=15,
                 params=dict(kind=kind, model=model, batch=batch, length=length))
            for kind in ("nonlinear", "linearized", "floor", "fit")]


def run(name: str, p: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxlin

    mem = H.MemoryProbe()
    if p["model"] == "minilm":
        model, batch = H.minilm_batch(p["batch"], fixed_length=p["length"])
    else:
        model, batch = S.model_and_batch(p["model"], p["batch"], p["length"])
    adapted = jaxlin.add_lora(model, targets=("query", "key", "value"), rank=8, alpha=8, head=True)
    x = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels")}
    theta0, frozen = adapted.trainable, adapted.frozen
    # move away from θ0 a little (B ≠ 0), so the step is a generic one
    theta = jax.tree.map(lambda a: a + 1e-3 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), theta0)
    opt = optax.adam(1e-3)
    state = opt.init(theta)

    def apply(t, fr, ids, mask):
        return adapted.apply(t, fr, ids, mask)

    def logits_fn(kind):
        if kind == "nonlinear":
            return lambda t, t0, fr, b: apply(t, fr, b["input_ids"], b["attention_mask"])
        return lambda t, t0, fr, b: jaxlin.linearize(apply, t0)(t, fr, b["input_ids"], b["attention_mask"])

    def make_loss(kind):
        f = logits_fn(kind)

        def loss(t, t0, fr, b):
            return optax.softmax_cross_entropy_with_integer_labels(f(t, t0, fr, b), b["labels"]).mean()
        return loss

    def make_step(kind):
        loss = make_loss(kind)

        def step(t, s, t0, fr, b):
            value, grads = jax.value_and_grad(loss)(t, t0, fr, b)
            updates, s = opt.update(grads, s, t)
            return optax.apply_updates(t, updates), s, value
        return step

    mem.mark_setup()
    # check before timing: at θ = θ0 the two losses and gradients agree
    g_nl = jax.jit(jax.value_and_grad(make_loss("nonlinear")))(theta0, theta0, frozen, x)
    g_li = jax.jit(jax.value_and_grad(make_loss("linearized")))(theta0, theta0, frozen, x)
    flat = lambda g: np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(g)])  # noqa: E731
    out = dict(kind=p["kind"], shape=list(x["input_ids"].shape), trainable_params=adapted.num_params(),
               check_loss_rel_err=abs(float(g_nl[0]) - float(g_li[0])) / abs(float(g_nl[0])),
               check_grad_rel_err=H.rel_err(flat(g_li[1]), flat(g_nl[1])))
    if p["kind"] == "floor":
        args = (theta, theta0, frozen, x)
        compiled, info = H.compile_apart(jax.value_and_grad(make_loss("nonlinear")), *args)
    elif p["kind"] == "fit":
        from jaxlin import train

        step = train.make_train_step(train.make_loss_fn(train.model_functions(adapted)[0]), opt)
        args = (theta, state, {**x, "example_mask": jnp.ones(x["labels"].shape, jnp.float32)})
        compiled, info = H.compile_apart(step, *args)
    else:
        args = (theta, state, theta0, frozen, x)
        compiled, info = H.compile_apart(make_step(p["kind"]), *args)
    out.update(info)
    t = H.time_call(lambda: compiled(*args), repeats=p.get("repeats", 5), warmup=1)
    out.update(t, time_s=t["median_s"])
    if out.get("flops"):
        out["flop_rate"] = out["flops"] / out["time_s"]
    out.update(mem.report())
    out["env"] = H.env_info()
    return out


def summarize(results):
    ok = {r["kind"]: r for r in results if r.get("module") == "bench_train" and r.get("status") == "ok"}
    out = {}
    if {"nonlinear", "linearized"} <= set(ok):
        nl, li = ok["nonlinear"], ok["linearized"]
        ratio = li["time_s"] / nl["time_s"]
        li["ratio_vs_nonlinear"] = ratio
        flops = li["flops"] / nl["flops"] if li.get("flops") and nl.get("flops") else None
        out.update(linearized_over_nonlinear=ratio, flop_ratio=flops, target_1p5x_met=ratio <= 1.5)
        if flops:  # time per FLOP of the nonlinear step relative to the linearized one's (target ≤ 1.1)
            per_flop = (nl["time_s"] / nl["flops"]) / (li["time_s"] / li["flops"])
            out.update(nonlinear_time_per_flop_vs_linearized=per_flop, target_per_flop_1p1x_met=per_flop <= 1.1)
    if {"fit", "floor"} <= set(ok):
        ok["fit"]["ratio_vs_floor"] = ok["fit"]["time_s"] / ok["floor"]["time_s"]
        out["fit_over_floor"] = ok["fit"]["ratio_vs_floor"]
    return out


COLUMNS = [("case", "case", ""), ("batch×L", "shape_str", ""), ("step time", "time_s", "s"),
           ("ratio vs nonlinear", "ratio_vs_nonlinear", "x"), ("ratio vs floor", "ratio_vs_floor", "x"),
           ("compile", "compile_s", "s"),
           ("XLA FLOPs", "flops", "flop"), ("FLOP/s", "flop_rate", "flop"), ("peak RSS Δ", "maxrss_delta_bytes", "B"),
           ("device peak", "device_peak_bytes", "B"), ("grad rel err at θ0", "check_grad_rel_err", "e"),
           ("status", "status", "")]


def table_rows(results):
    return [dict(r, shape_str="×".join(map(str, r.get("shape", [])))) for r in results
            if r.get("module") == "bench_train"]


if __name__ == "__main__":
    H.case_main("bench_train", run)
