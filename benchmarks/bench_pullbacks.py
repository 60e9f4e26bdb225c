"""How jaxlin takes the pullbacks of a reverse-mode Jacobian: `jax.lax.map` (one VJP after another) or `jax.vmap`.

`jaxlin.ntk.map_over_outputs` is the one place that chooses. This benchmark times both choices on the packaged
MiniLM classifier (LoRA r = 8 on q/k/v of all six layers, N = 32 texts padded to 64 tokens, O = 2 logits) for
the tile functions of the `structured` and `jacobian_contraction` kernels, float32, compile apart. The two
choices alternate within one process (A, B, A, B, …) so machine load hits both alike; each kernel is checked
against the other before timing.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_pullbacks.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _harness as H
from benchmarks import _setups as S
from jaxlin import module_ntk, ntk

CHOICES = {"lax.map": lambda fn, xs: jax.lax.map(fn, xs), "vmap": lambda fn, xs: jax.vmap(fn)(xs)}


def compiled_tile(adapted, method, choice, x, x2):
    ntk.map_over_outputs = CHOICES[choice]  # read when the tile function is traced, i.e. inside compile_apart
    tile = module_ntk.tile_function(adapted, adapted.modules, None, "ntk", False, method)
    total = lambda a, b, t, f: sum(tile(a, b, t, f).values())  # noqa: E731
    return H.compile_apart(total, x, x2, adapted.trainable, adapted.frozen)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n", type=int, default=32)
    args = p.parse_args(argv)
    model, batch = S.model_and_batch("minilm", args.n, 64)
    adapted = S.adapt(model, "lora")
    x = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    x2 = {k: jnp.array(v, copy=True) for k, v in x.items()}
    call_args = (x, x2, adapted.trainable, adapted.frozen)
    rows = []
    for method in ("structured", "jacobian_contraction"):
        compiled = {c: compiled_tile(adapted, method, c, x, x2) for c in CHOICES}
        kernels = {c: np.asarray(jax.block_until_ready(f(*call_args)), np.float64) for c, (f, _) in compiled.items()}
        err = H.rel_err(kernels["vmap"], kernels["lax.map"])
        times = {c: [] for c in CHOICES}
        for _ in range(args.repeats):
            for c, (f, _) in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(f(*call_args))
                times[c].append(time.perf_counter() - t)
        for c, (_, info) in compiled.items():
            rows.append(dict(method=method, choice=c, median_s=statistics.median(times[c]), times_s=times[c],
                             compile_s=info.get("compile_s"), flops=info.get("flops"), rel_err_vs_other=err))
    for r in rows:
        print(f"{r['method']:22s} {r['choice']:8s} median {r['median_s']:.3f} s  compile {r['compile_s']:.1f} s  "
              f"flops {r['flops'] or float('nan'):.3g}  kernels differ by {r['rel_err_vs_other']:.1e}")
    print("RESULT: " + json.dumps(dict(env=H.env_info(), n=args.n, rows=rows), default=float))


if __name__ == "__main__":
    main()
