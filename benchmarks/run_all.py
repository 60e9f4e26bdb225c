"""Run every benchmark, one subprocess per case, print the tables and write results/<device>-<date>.json.

    PYTHONPATH=. python benchmarks/run_all.py --size smoke|cpu|gpu [--only ntk,train] [--budget-s 480]

Sizes: ``smoke`` (toy RoBERTa, random weights, no transformers needed, < 3 min on CPU), ``cpu`` (the
packaged MiniLM on real data: needs transformers and the packaged assets), ``gpu`` (RoBERTa-base dimensions
with random weights, no transformers; about 8 minutes on one H100). ``--budget-s`` skips the cases that
would start after the budget is spent (they are recorded as "skipped").
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/run_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402

BENCHES = {"ntk": "bench_ntk", "scaling": "bench_scaling", "train": "bench_train", "solve": "bench_solve"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("smoke", "cpu", "cpu-large", "gpu"), default="smoke")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--budget-s", type=float, default=None, help="skip cases that would start after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=None)
    p.add_argument("--out", default=None, help="result JSON path (default results/<device>-<date>.json)")
    p.add_argument("--resume", default=None, help="a .partial.jsonl of an earlier run: its finished cases are reused")
    p.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    timeout = a.case_timeout_s or {"smoke": 120, "cpu": 900, "cpu-large": 1800, "gpu": 300}[a.size]

    load_before = H.load_average()
    t_start = time.perf_counter()
    kdir = os.environ.get("JAXLIN_BENCH_KERNELS") or tempfile.mkdtemp(prefix="jaxlin-bench-kernels-")
    keep_kernels = "JAXLIN_BENCH_KERNELS" in os.environ
    env = {"JAXLIN_BENCH_KERNELS": kdir}
    results, tables = [], []
    selected = [b.strip() for b in a.only.split(",") if b.strip()]
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / (
        f"{H.device_tag()}-{a.size}-{datetime.date.today().isoformat()}.json")
    partial = out.with_suffix(".partial.jsonl")
    done = {}
    if a.resume:
        import json
        for line in Path(a.resume).read_text().splitlines():
            r = json.loads(line)
            if r.get("status") == "ok":
                done[(r["module"], r["case"])] = r
        print(f"resuming: {len(done)} finished cases from {a.resume}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial_fh = open(partial, "a")
    todo = []
    for key in selected:
        mod = importlib.import_module(f"benchmarks.{BENCHES[key]}")
        for case in ([] if a.size == "cpu-large" and key != "ntk" else mod.cases(a.size)):
            todo.append((key, case))
    # a case may carry a "priority" (lower first; default: the benchmark's order): under a budget the most
    # informative cases of every benchmark run before the expensive extras
    todo = [t for _, t in sorted(enumerate(todo), key=lambda it: (it[1][1].get("priority", 50), it[0]))]
    for key, case in todo:
        if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
            results.append(dict(case=case["name"], module=BENCHES[key], status="skipped (budget)",
                                params=case.get("params")))
            print(f"  [{BENCHES[key]}] {case['name']} skipped: budget of {a.budget_s:.0f} s spent", flush=True)
            continue
        if (BENCHES[key], case["name"]) in done:
            results.append(done[(BENCHES[key], case["name"])])
            print(f"  [{BENCHES[key]}] {case['name']} reused from {a.resume}", flush=True)
            continue
        case_env = dict(env, **case.get("env", {}))
        left = None if a.budget_s is None else a.budget_s + 60 - (time.perf_counter() - t_start)
        r = H.run_case(BENCHES[key], case, timeout=timeout if left is None else max(30.0, min(timeout, left)),
                       env=case_env)
        results.append(r)
        import json
        partial_fh.write(json.dumps(r, default=H._json_default) + "\n")
        partial_fh.flush()
    summaries = {}
    for key in selected:
        mod = importlib.import_module(f"benchmarks.{BENCHES[key]}")
        summaries[key] = mod.summarize(results)
        tables.append(H.print_table(f"{BENCHES[key]} ({a.size})", mod.table_rows(results), mod.COLUMNS))
        if summaries[key]:
            import json
            text = json.dumps(summaries[key], indent=1, default=H._json_default)
            print(text, flush=True)
            tables.append("```json\n" + text + "\n```\n")
    load_after = H.load_average()
    import jax

    info = H.env_info()
    info.update(load_average_before=load_before, load_average_after=load_after, size=a.size,
                total_wall_s=time.perf_counter() - t_start)
    for r in results:
        r.pop("env", None) if r.get("env", {}).get("jax_version") == info["jax_version"] else None
    H.write_json(out, dict(env=info, summaries=summaries, results=results))
    header = (f"device: {info['device_kind']} ({info['platform']}, {info.get('cpu_model', '')}, {info['cpu_count']} "
              f"cores), jax {info['jax_version']}, load average before {load_before}, after {load_after}, "
              f"total {info['total_wall_s']:.0f} s\n")
    print(header)
    if a.markdown:
        Path(a.markdown).write_text(header + "\n" + "\n".join(tables))
    print(f"wrote {out}")
    if not keep_kernels:
        for f in os.listdir(kdir):
            os.remove(os.path.join(kdir, f))
        os.rmdir(kdir)
    del jax
    return 0


if __name__ == "__main__":
    sys.exit(main())
