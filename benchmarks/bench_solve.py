"""A 20-point ridge sweep: one eigh (``jaxlin.ridge_path``) vs 20 Cholesky solves (``jaxlin.kernel_ridge``).

Target (issue 7): the whole 20-ridge path costs ≤ 1.5× ONE Cholesky solve. K = G Gᵀ/p (n × n, p = n/2 + 7, so
K is rank-deficient like a real NTK Gram, plus the ridge), r0 random (n, 2); float64 (jax_enable_x64, as the
library recommends for solves). Both are jitted once (the ridge is a traced argument of kernel_ridge, so the
loop does not recompile); compile timed apart. Check before timing: every dual of the path equals the
Cholesky dual at that ridge.
"""
from __future__ import annotations

from . import _harness as H

RIDGES = 20


def cases(size: str) -> list[dict]:
    sizes = {"smoke": (128,), "cpu": (512, 2048), "gpu": (512, 2048, 4096)}[size]
    return [dict(name=f"ridge-sweep-n{n}", priority=25 + i, params=dict(n=n)) for i, n in enumerate(sizes)]


def run(name: str, p: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import jaxlin

    mem = H.MemoryProbe()
    n = p["n"]
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, n // 2 + 7))
    gram = jnp.asarray(g @ g.T / g.shape[1])
    resid = jnp.asarray(rng.standard_normal((n, 2)))
    ridges = jnp.asarray(np.logspace(-4, 2, RIDGES))
    mem.mark_setup()

    path_fn = lambda k, r, lam: jaxlin.ridge_path(k, r, lam).dual  # noqa: E731
    solve_fn = lambda k, r, lam: jaxlin.kernel_ridge(k, r, lam).value  # noqa: E731
    path_c, pinfo = H.compile_apart(path_fn, gram, resid, ridges)
    solve_c, sinfo = H.compile_apart(solve_fn, gram, resid, ridges[0])

    def loop(k, r, lams):
        return [solve_c(k, r, lam) for lam in lams]

    lams = [ridges[i] for i in range(RIDGES)]  # device scalars made once, outside the timed loop
    duals = np.asarray(path_c(gram, resid, ridges))
    chol = np.stack([np.asarray(a) for a in loop(gram, resid, lams)])
    errs = [H.rel_err(duals[i], chol[i]) for i in range(RIDGES)]
    reps = p.get("repeats", 5)
    t_path = H.time_call(path_c, gram, resid, ridges, repeats=reps)
    t_one = H.time_call(solve_c, gram, resid, lams[0], repeats=reps)
    t_loop = H.time_call(loop, gram, resid, lams, repeats=max(1, reps // 2))
    out = dict(n=n, ridges=RIDGES, dtype=str(gram.dtype), max_rel_err_path_vs_cholesky=max(errs),
               path_s=t_path["median_s"], one_cholesky_s=t_one["median_s"], loop_cholesky_s=t_loop["median_s"],
               path_compile_s=pinfo["compile_s"], cholesky_compile_s=sinfo["compile_s"],
               path_flops=pinfo["flops"], cholesky_flops=sinfo["flops"],
               path_over_one_solve=t_path["median_s"] / t_one["median_s"],
               loop_over_path=t_loop["median_s"] / t_path["median_s"], time_s=t_path["median_s"])
    out["target_1p5x_met"] = out["path_over_one_solve"] <= 1.5
    out.update(mem.report())
    out["env"] = H.env_info()
    return out


def summarize(results):
    ok = [r for r in results if r.get("module") == "bench_solve" and r.get("status") == "ok"]
    return {f"n{r['n']}": dict(path_over_one_solve=r["path_over_one_solve"], loop_over_path=r["loop_over_path"],
                               target_1p5x_met=r["target_1p5x_met"]) for r in ok}


COLUMNS = [("case", "case", ""), ("n", "n", ""), ("path: 1 eigh, 20 λ", "path_s", "s"),
           ("1 Cholesky solve", "one_cholesky_s", "s"), ("20 Cholesky solves", "loop_cholesky_s", "s"),
           ("path / 1 solve", "path_over_one_solve", "x"), ("20 solves / path", "loop_over_path", "x"),
           ("≤1.5× met", "target_1p5x_met", ""), ("max rel err", "max_rel_err_path_vs_cholesky", "e"),
           ("path FLOPs", "path_flops", "flop"), ("Cholesky FLOPs", "cholesky_flops", "flop"), ("status", "status", "")]


def table_rows(results):
    return [dict(r, target_1p5x_met=str(r.get("target_1p5x_met"))) for r in results
            if r.get("module") == "bench_solve"]


if __name__ == "__main__":
    H.case_main("bench_solve", run)
