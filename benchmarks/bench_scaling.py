"""Blocked Gram scaling: time and peak memory vs N·O at a fixed block size, and over simulated CPU devices.

Model: a 3-layer tanh MLP f(params, x) -> (N, O = 2) (cheap, so the Gram machinery is what is measured),
through ``jaxlin.empirical_ntk(..., implementation="jacobian_contraction", trace_axes=(), block_size=B)``,
i.e. ``jaxlin.blocked_gram`` over (B × B) tiles with symmetric reuse and float64 host accumulation.

Memory: every size runs in its own process; ``maxrss_delta`` is the RSS high-water mark over the RSS after
setup. The host output itself is (N·O)² float64 and must grow; ``working_bytes = maxrss_delta − output
bytes`` is what must stay flat (and XLA's planned temp bytes of the tile, which depend on B only).

Devices: the same Gram (N·O = 2048) with ``mesh=Mesh(devices[:d], ("data",))`` over d = 1, 2, 4, 8 simulated
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, ``JAX_PLATFORMS=cpu``), checked equal to
the 1-device result; per-device bytes are XLA's memory analysis of the sharded tile executable (it reports one
device's buffers). Simulated devices share the same cores, so their timings show overhead, not speed-up.
"""
from __future__ import annotations

import os

from . import _harness as H
from . import _setups as S

D_IN, WIDTH, O = 32, 256, 2


def cases(size: str) -> list[dict]:
    if size == "smoke":
        sizes, block, dev_n, devs = (512,), 64, 128, (1, 2)
    elif size == "cpu":
        sizes, block, dev_n, devs = (64, 128, 256, 512, 1024, 2048, 4096, 8192), 128, 1024, (1, 2, 4, 8)
    elif size == "gpu":
        sizes, block, dev_n, devs = (256, 2048, 8192), 256, 1024, (1, 8)
    else:
        raise ValueError(f"unknown size {size!r}")
    out = [dict(name=f"gram-NO{no}-b{block}", priority=30,
                params=dict(kind="size", n=no // O, block_size=block, repeats=1 if no >= 4096 else 3))
           for no in sizes]
    env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
           "JAX_PLATFORMS": "cpu"}
    out += [dict(name=f"gram-NO{dev_n * O}-b{block}-cpu{d}dev", env=env, priority=31,
                 params=dict(kind="devices", n=dev_n, block_size=block, devices=d)) for d in devs]
    return out


def mlp(params, x):
    import jax.numpy as jnp

    h = jnp.tanh(x["x"] @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    return h @ params["w3"]


def make(n, seed=0):
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 4)
    params = dict(w1=jax.random.normal(k[0], (D_IN, WIDTH)) / D_IN ** 0.5, b1=jnp.zeros(WIDTH),
                  w2=jax.random.normal(k[1], (WIDTH, WIDTH)) / WIDTH ** 0.5, b2=jnp.zeros(WIDTH),
                  w3=jax.random.normal(k[2], (WIDTH, O)) / WIDTH ** 0.5)
    x = {"x": jax.random.normal(k[3], (n, D_IN))}
    return params, x


def run(name: str, p: dict) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxlin
    from jaxlin import gram

    mem = H.MemoryProbe()
    n, b = p["n"], p["block_size"]
    params, x = make(n)
    ntk = jaxlin.empirical_ntk_fn(mlp, trace_axes=(), implementation="jacobian_contraction")
    mesh = None
    d = p.get("devices", 1)
    if p["kind"] == "devices":
        if jax.device_count() < d:
            return dict(status=f"error: {jax.device_count()} devices, need {d}")
        mesh = Mesh(np.array(jax.devices()[:d]), ("data",))
    out = dict(kind=p["kind"], n=n, NO=n * O, block_size=b, devices=d,
               params_count=int(sum(v.size for v in jax.tree.leaves(params))))
    mem.mark_setup()
    # the tile executable alone: compile time, FLOPs and XLA's per-device memory plan
    bb = min(b, n)
    bb = -(-bb // d) * d
    xt = jax.tree.map(lambda a: a[:bb], x)
    if mesh is None:
        _, info = H.compile_apart(ntk, xt, xt, params)
    else:
        rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        args = (jax.device_put(xt, rows), jax.device_put(xt, rep), jax.device_put(params, rep))
        _, info = H.compile_apart(ntk, *args, jit_kwargs=dict(out_shardings=rows))
    out.update(info)
    call = lambda: jaxlin.empirical_ntk(mlp, params, x, block_size=b, trace_axes=(),  # noqa: E731
                                        implementation="jacobian_contraction", mesh=mesh)
    k, first = H.time_once(call)
    m = min(n, 64)  # check before timing: the first m rows against one dense (un-tiled) Gram; constant memory
    ref = np.asarray(jax.jit(ntk)(jax.tree.map(lambda a: a[:m], x), None, params), np.float64)
    out["rel_err_dense"] = H.rel_err(np.asarray(k)[:m, :m], ref)
    out["output_bytes"] = int(np.asarray(k).nbytes)
    path = os.path.join(S.kernel_dir(), f"scaling-{name}.npy")
    np.save(path, np.asarray(k))
    out["kernel_path"] = path
    del k  # so that the timed calls do not hold two outputs at once (the RSS delta counts one output)
    t = H.time_call(call, repeats=p.get("repeats", 3), warmup=0)
    out.update(t, time_s=t["median_s"], first_call_s=first)
    tiles = -(-n // bb)
    out["tiles"] = tiles * (tiles + 1) // 2
    if info.get("flops"):
        out["flops"] = info["flops"] * out["tiles"]
        out["flop_rate"] = out["flops"] / out["time_s"]
    out.update(mem.report())
    out["working_bytes"] = out["maxrss_delta_bytes"] - out["output_bytes"]
    ma = out.get("memory_analysis") or {}
    if ma:
        out["per_device_bytes"] = ma.get("argument_size_in_bytes", 0) + ma.get("output_size_in_bytes", 0) + \
            ma.get("temp_size_in_bytes", 0)
    out["env"] = H.env_info()
    return out


def summarize(results):
    import numpy as np

    ok = [r for r in results if r.get("module") == "bench_scaling" and r.get("status") == "ok"]
    one = next((r for r in ok if r["kind"] == "devices" and r["devices"] == 1), None)
    for r in ok:
        if r["kind"] == "devices" and one is not None:
            r["rel_err_vs_1dev"] = H.rel_err(np.load(r["kernel_path"]), np.load(one["kernel_path"]))
    sizes = [r for r in ok if r["kind"] == "size"]
    if not sizes:
        return {}
    fixed = [r for r in sizes if r["n"] >= r["block_size"]]
    w = [r["working_bytes"] for r in fixed] or [0]
    return dict(working_bytes_min=min(w), working_bytes_max=max(w),
                memory_flat=bool(max(w) - min(w) < 64 * 2 ** 20),
                devices_equal=all((r.get("rel_err_vs_1dev") or 0) < 1e-6 for r in ok if r["kind"] == "devices"))


COLUMNS = [("case", "case", ""), ("N·O", "NO", ""), ("devices", "devices", ""), ("tiles", "tiles", ""),
           ("time", "time_s", "s"), ("tile compile", "compile_s", "s"), ("FLOP/s", "flop_rate", "flop"),
           ("output (N·O)² f64", "output_bytes", "B"), ("peak RSS Δ", "maxrss_delta_bytes", "B"),
           ("working = RSS Δ − output", "working_bytes", "B"), ("tile temp (XLA, per device)", "temp", "B"),
           ("tile bytes/device", "per_device_bytes", "B"), ("rel err", "err", "e"), ("status", "status", "")]


def table_rows(results):
    rows = []
    for r in results:
        if r.get("module") != "bench_scaling":
            continue
        err = r.get("rel_err_vs_1dev", r.get("rel_err_dense"))  # devices: vs 1 device; sizes: first ≤64 rows vs dense
        rows.append(dict(r, temp=(r.get("memory_analysis") or {}).get("temp_size_in_bytes"), err=err))
    return rows


if __name__ == "__main__":
    H.case_main("bench_scaling", run)
