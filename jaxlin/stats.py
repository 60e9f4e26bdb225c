"""Correlations between spectral predictors and fine-tuning outcomes (docs/paper.md §5.1), numpy only.

The paper's claim is that κ at init predicts final train loss and accuracy across runs; with a handful of
runs the interval matters as much as the point value, so every coefficient comes with a bootstrap CI.
"""
import math

import numpy as np


def average_ranks(a_n):
    """Ranks 1..n of a 1-D array, ties given the mean of the ranks they span (as scipy's rankdata)."""
    _, inverse, counts = np.unique(a_n, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last member of each tie group
    return (upper - (counts - 1) / 2.0)[inverse]


def _pearson_rows(x_bn, y_bn):
    """Pearson r per row: Σ(x−x̄)(y−ȳ)/√(Σ(x−x̄)² Σ(y−ȳ)²); nan for a constant row."""
    xc = x_bn - x_bn.mean(axis=1, keepdims=True)
    yc = y_bn - y_bn.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(xc * xc, axis=1) * np.sum(yc * yc, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(xc * yc, axis=1) / den
    constant = (np.ptp(x_bn, axis=1) == 0) | (np.ptp(y_bn, axis=1) == 0)  # exact, unlike den > 0
    r = np.where(constant | ~(den > 0), np.nan, r)
    return np.clip(r, -1.0, 1.0)


def _ranks_rows(a_bn):
    return np.stack([average_ranks(row) for row in a_bn])


def _nan_result(n, n_dropped, reason, confidence, n_bootstrap):
    nan_ci = (math.nan, math.nan)
    return {"n": n, "n_dropped": n_dropped, "pearson": math.nan, "spearman": math.nan,
            "pearson_ci": nan_ci, "spearman_ci": nan_ci, "confidence": confidence,
            "n_bootstrap": n_bootstrap, "n_bootstrap_valid": 0, "reason": reason}


def correlation(x, y, *, n_bootstrap=2000, confidence=0.95, seed=0):
    """Pearson and Spearman correlation of paired samples with percentile bootstrap CIs.

    Pearson r = Σ(x−x̄)(y−ȳ)/√(Σ(x−x̄)² Σ(y−ȳ)²); Spearman ρ = Pearson r of the average ranks
    (ties share their mean rank). Pairs with a non-finite member are dropped (`n_dropped`). CI: resample the n pairs
    with replacement n_bootstrap times (numpy default_rng(seed)), recompute both coefficients, take the
    (1−confidence)/2 and (1+confidence)/2 percentiles over resamples where they are defined
    (`n_bootstrap_valid`; a resample whose x or y is constant has none).
    Never raises for degenerate data: with n < 3 or a constant x or y every value is nan and `reason`
    says why; otherwise `reason` is None. Raises ValueError only for mismatched lengths or bad settings.
    """
    x_n = np.asarray(x, dtype=np.float64).reshape(-1)
    y_n = np.asarray(y, dtype=np.float64).reshape(-1)
    if x_n.shape != y_n.shape:
        raise ValueError(f"x has {x_n.size} values but y has {y_n.size}; pass paired samples of equal length")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95")
    if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be a positive integer, e.g. 2000")
    keep = np.isfinite(x_n) & np.isfinite(y_n)
    x_n, y_n = x_n[keep], y_n[keep]
    n, n_dropped = int(x_n.size), int((~keep).sum())
    if n < 3:
        return _nan_result(n, n_dropped, f"need at least 3 finite pairs, got {n}", confidence, n_bootstrap)
    constant = [name for name, v in (("x", x_n), ("y", y_n)) if np.ptp(v) == 0]
    if constant:
        return _nan_result(n, n_dropped, f"{' and '.join(constant)} constant: correlation undefined",
                           confidence, n_bootstrap)
    pearson = float(_pearson_rows(x_n[None], y_n[None])[0])
    spearman = float(_pearson_rows(average_ranks(x_n)[None], average_ranks(y_n)[None])[0])
    idx_bn = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    xb, yb = x_n[idx_bn], y_n[idx_bn]
    boot_p = _pearson_rows(xb, yb)
    boot_s = _pearson_rows(_ranks_rows(xb), _ranks_rows(yb))
    valid = np.isfinite(boot_p) & np.isfinite(boot_s)
    q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])

    def ci(values):
        return tuple(float(v) for v in np.percentile(values[valid], q)) if valid.any() else (math.nan, math.nan)

    return {"n": n, "n_dropped": n_dropped, "pearson": pearson, "spearman": spearman,
            "pearson_ci": ci(boot_p), "spearman_ci": ci(boot_s), "confidence": confidence,
            "n_bootstrap": n_bootstrap, "n_bootstrap_valid": int(valid.sum()), "reason": None}
