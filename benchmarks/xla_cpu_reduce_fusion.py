"""Minimal repro of the jaxlib 0.10.2 XLA:CPU fault that `jaxlin.check_backend` guards against (docs/backend.md).

Plain JAX and NumPy, no jaxlin: each case is computed by XLA in float32 and by NumPy in float64 from the same
inputs, just below and just above the size at which 0.10.2's fused YNNPACK reduction starts reusing slice 0's
sum for slice 1. Prints the relative error of slice 1 (max |Δ| / max |reference|) per case, then reruns itself
with the fusion turned off (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/xla_cpu_reduce_fusion.py

Affected: jaxlib 0.10.2 only. Right: 0.8.3, 0.9.2, 0.10.0, 0.10.1, 0.11.0, 0.11.2, 0.12.0.1.
Measured results per version are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def broadcast_reduce(rows):
    """c + (x·c).sum(-1): x (rows, 64), c (2, rows, 64); one slice is rows × 64 elements."""
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((rows, 64), np.float32), rng.standard_normal((2, rows, 64), np.float32)
    got = jax.jit(lambda x, c: c + (x * c).sum(-1, keepdims=True))(x, c)
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return np.asarray(got), c64 + (x64 * c64).sum(-1, keepdims=True)


def layer_norm(x, scale):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale


def layer_norm_vjp(rows, width=384):
    """A layer norm's pullback vmapped over two cotangents (rows = batch × tokens; MiniLM's width 384)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, width), np.float32)
    scale = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
    ct = rng.standard_normal((2, rows, width), np.float32)

    def pullbacks(x, scale, ct):
        _, pull = jax.vjp(lambda x: layer_norm(x, scale), x)
        return jax.vmap(lambda c: pull(c)[0])(ct)

    got = jax.jit(pullbacks)(x, scale, ct)
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    std = np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat, g = (x64 - mean) / std, ct.astype(np.float64) * scale
    want = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / std
    return np.asarray(got), want


CASES = [("broadcast_reduce", broadcast_reduce, (256, 257)), ("layer_norm_vjp", layer_norm_vjp, (2047, 2048))]


def main():
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, {jax.devices()[0].device_kind}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for name, case, sizes in CASES:
        for rows in sizes:
            got, want = case(rows)
            err = np.abs(got[1] - want[1]).max() / np.abs(want[1]).max()
            print(f"  {name:18s} rows={rows:5d}  slice-1 relative error {err:.2g}{'   WRONG' if err > 1e-4 else ''}")
    if FLAG not in os.environ.get("XLA_FLAGS", ""):
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()}
        subprocess.run([sys.executable, __file__], env=env, check=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before printing
    main()
