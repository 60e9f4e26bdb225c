"""Repro of the XLA:CPU discrepancy behind jaxlin's one-VJP-per-output rule (module_ntk.py, "structured").

The packaged MiniLM classifier with LoRA (B = 0) on q/k/v; f(θ) = logits (N, 2) of N real texts. For each
output o the cotangent e_o broadcast over all examples gives Σ_x ∂f_o(x)/∂θ. We take both VJPs in one jitted
call, (a) as `jax.vmap(vjp)` over the two cotangents and (b) as two separate `vjp` calls, in float32, and
compare each with the float64 answer. Run from the repository root:

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/xla_cpu_vmapped_vjp.py [N ...]

Measured 2026-11-28, jax/jaxlib 0.10.2, 2-core AMD EPYC (max |Δ| / max |g64| per output):
    N =  8 and 31: every variant ≤ 7.3e-7 (float32 rounding)
    N = 32: one vjp per output 7.4e-7, 5.7e-7; vmap over outputs 3.6e-7 and **6.8e-1** for the second output
Narrowing (same machine): the vmapped VJP in float64 is right at N = 32 (1e-15), so batching semantics are
fine and the fault is float32-specific; with LoRA only on layer 0's value projection the second output's
gradient is off by 8.2× its size (layer 5 only: 7.6 %; head only: exact), so it grows with the depth of the
backward pass. Unchanged by XLA_FLAGS --xla_cpu_multi_thread_eigen=false, --xla_cpu_use_xnnpack=false,
--xla_cpu_use_onednn=false, --xla_cpu_use_fusion_emitters=false or --xla_cpu_strict_dot_conv_math=true.
neural-tangents vmaps its VJPs the same way and is off by the same mechanism (so were jaxlin's
jacobian_contraction and ntk_vector_products until they switched to `jaxlin.ntk.jacrev_per_output`).
Not yet reduced to plain JAX.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._harness import minilm_batch


def gradients(adapted, batch, dtype, vmapped: bool):
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating)  # noqa: E731
                                     else a, tree)
    trainable, frozen = cast(adapted.trainable), cast(adapted.frozen)

    @jax.jit
    def run(trainable, frozen, ids, mask):
        out, vjp = jax.vjp(lambda t: adapted.apply(t, frozen, ids, mask), trainable)
        basis = jnp.broadcast_to(jnp.eye(out.shape[1], dtype=out.dtype)[:, None, :], (out.shape[1],) + out.shape)
        if vmapped:
            return jax.vmap(lambda e: vjp(e)[0])(basis)
        return jax.tree.map(lambda *g: jnp.stack(g), *[vjp(e)[0] for e in basis])

    grads = run(trainable, frozen, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    return np.concatenate([np.asarray(g, np.float64).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1)


def main(sizes):
    jax.config.update("jax_enable_x64", True)
    import jaxlin

    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}, "
          f"{jax.devices()}")
    model, full = minilm_batch(max(sizes))
    adapted = jaxlin.add_lora(model, targets=("query", "key", "value"), rank=8, alpha=8)
    for n in sizes:
        batch = {k: full[k][:n] for k in ("input_ids", "attention_mask")}
        ref = gradients(adapted, batch, jnp.float64, vmapped=False)
        scale = np.abs(ref).max(axis=1)
        for vmapped in (True, False):
            g = gradients(adapted, batch, jnp.float32, vmapped)
            err = np.abs(g - ref).max(axis=1) / scale
            print(f"N={n:3d} float32 {'vmap over outputs' if vmapped else 'one vjp per output':18s} "
                  f"max|Δ|/max|g64| per output: " + ", ".join(f"{e:.1e}" for e in err), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8, 31, 32])
