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
    return _weighted_pearson_rows(x_bn, y_bn, np.ones(np.shape(x_bn)))


def _ranks_rows(a_bn):
    return np.stack([average_ranks(row) for row in a_bn])


def _weighted_pearson_rows(x, y, w_bn):
    """Pearson r of the sample in which pair i appears w_bn[b, i] times (integer counts), per row b, without
    building it; x, y are (n,) or (B, n). nan where the drawn x or y is constant (exactly, unlike den > 0)."""
    x_bn, y_bn = np.broadcast_to(x, w_bn.shape), np.broadcast_to(y, w_bn.shape)
    total_b = w_bn.sum(axis=1, keepdims=True)
    xc = x_bn - (w_bn * x_bn).sum(axis=1, keepdims=True) / total_b
    yc = y_bn - (w_bn * y_bn).sum(axis=1, keepdims=True) / total_b
    den = np.sqrt(np.sum(w_bn * xc * xc, axis=1) * np.sum(w_bn * yc * yc, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(w_bn * xc * yc, axis=1) / den
    drawn = w_bn > 0
    constant = (np.where(drawn, x_bn, -np.inf).max(1) == np.where(drawn, x_bn, np.inf).min(1)) | \
               (np.where(drawn, y_bn, -np.inf).max(1) == np.where(drawn, y_bn, np.inf).min(1))
    return np.clip(np.where(constant | ~(den > 0), np.nan, r), -1.0, 1.0)


def _weighted_ranks_rows(a_n, w_bn):
    """(B, n): the average rank (`average_ranks`) each value of a_n has in the sample that repeats value i
    w_bn[b, i] times: the count drawn below its value plus the mean of the ranks its ties take."""
    _, tie_n = np.unique(a_n, return_inverse=True)
    tie_n = tie_n.reshape(-1)
    drawn_bt = np.zeros((w_bn.shape[0], tie_n.max() + 1))
    np.add.at(drawn_bt, (slice(None), tie_n), w_bn)
    upto_bt = np.cumsum(drawn_bt, axis=1)  # drawn with a value ≤ this tie group's
    return (upto_bt - (drawn_bt - 1) / 2.0)[:, tie_n]


def _nan_result(n, n_dropped, reason, confidence, n_bootstrap, group_n):
    nan_ci = (math.nan, math.nan)
    return {"n": n, "n_dropped": n_dropped, "pearson": math.nan, "spearman": math.nan,
            "pearson_ci": nan_ci, "spearman_ci": nan_ci, "confidence": confidence,
            "n_bootstrap": n_bootstrap, "n_bootstrap_valid": 0, "reason": reason, **_resampling(n, group_n)}


def _resampling(n, group_n) -> dict:
    if group_n is None:
        return {"resampling": "pairs", "n_groups": n}
    return {"resampling": "groups", "n_groups": int(group_n.max() + 1) if group_n.size else 0}


def correlation(x, y, *, groups=None, n_bootstrap=2000, confidence=0.95, seed=0):
    """Pearson and Spearman correlation of paired samples with percentile bootstrap CIs.

    Pearson r = Σ(x−x̄)(y−ȳ)/√(Σ(x−x̄)² Σ(y−ȳ)²); Spearman ρ = Pearson r of the average ranks
    (ties share their mean rank). Pairs with a non-finite member are dropped (`n_dropped`). CI: resample the n pairs
    with replacement n_bootstrap times (numpy default_rng(seed)), recompute both coefficients, take the
    (1−confidence)/2 and (1+confidence)/2 percentiles over resamples where they are defined
    (`n_bootstrap_valid`; a resample whose x or y is constant has none).
    groups: one label per pair (e.g. each run's configuration). Then the CI resamples whole groups with
    replacement (a cluster bootstrap), because pairs of one group share most of x (a configuration's κ barely
    moves with the seed) and are not independent; `resampling` says "groups" and `n_groups` how many, else
    "pairs" and n. The coefficients themselves do not depend on `groups`.
    Never raises for degenerate data: with n < 3 or a constant x or y every value is nan and `reason`
    says why; otherwise `reason` is None. Raises ValueError only for mismatched lengths or bad settings.
    """
    x_n = np.asarray(x, dtype=np.float64).reshape(-1)
    y_n = np.asarray(y, dtype=np.float64).reshape(-1)
    if x_n.shape != y_n.shape:
        raise ValueError(f"x has {x_n.size} values but y has {y_n.size}; pass paired samples of equal length")
    if groups is not None and len(groups) != x_n.size:
        raise ValueError(f"groups has {len(groups)} labels for {x_n.size} pairs; pass one label per pair")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95")
    if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be a positive integer, e.g. 2000")
    keep = np.isfinite(x_n) & np.isfinite(y_n)
    x_n, y_n = x_n[keep], y_n[keep]
    n, n_dropped = int(x_n.size), int((~keep).sum())
    group_n = None if groups is None else np.unique(np.asarray(groups, dtype=object)[keep].astype(str),
                                                    return_inverse=True)[1]
    if n < 3:
        return _nan_result(n, n_dropped, f"need at least 3 finite pairs, got {n}", confidence, n_bootstrap,
                           group_n)
    constant = [name for name, v in (("x", x_n), ("y", y_n)) if np.ptp(v) == 0]
    if constant:
        return _nan_result(n, n_dropped, f"{' and '.join(constant)} constant: correlation undefined",
                           confidence, n_bootstrap, group_n)
    pearson = float(_pearson_rows(x_n[None], y_n[None])[0])
    spearman = float(_pearson_rows(average_ranks(x_n)[None], average_ranks(y_n)[None])[0])
    rng = np.random.default_rng(seed)
    if group_n is None:
        idx_bn = rng.integers(0, n, size=(n_bootstrap, n))
        xb, yb = x_n[idx_bn], y_n[idx_bn]
        boot_p = _pearson_rows(xb, yb)
        boot_s = _pearson_rows(_ranks_rows(xb), _ranks_rows(yb))
    else:  # a resample of whole groups is the sample with each pair counted as often as its group was drawn
        num_groups = group_n.max() + 1
        chosen_bg = rng.integers(0, num_groups, size=(n_bootstrap, num_groups))
        drawn_bg = np.stack([np.bincount(row, minlength=num_groups) for row in chosen_bg])
        w_bn = drawn_bg[:, group_n].astype(np.float64)
        boot_p = _weighted_pearson_rows(x_n, y_n, w_bn)
        boot_s = _weighted_pearson_rows(_weighted_ranks_rows(x_n, w_bn), _weighted_ranks_rows(y_n, w_bn), w_bn)
    valid = np.isfinite(boot_p) & np.isfinite(boot_s)
    q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])

    def ci(values):
        return tuple(float(v) for v in np.percentile(values[valid], q)) if valid.any() else (math.nan, math.nan)

    return {"n": n, "n_dropped": n_dropped, "pearson": pearson, "spearman": spearman,
            "pearson_ci": ci(boot_p), "spearman_ci": ci(boot_s), "confidence": confidence,
            "n_bootstrap": n_bootstrap, "n_bootstrap_valid": int(valid.sum()), "reason": None,
            **_resampling(n, group_n)}


def modal_tie_fraction(values) -> float:
    """The fraction of `values` equal to their most common value (1.0 when all tie; nan when empty). An outcome
    whose runs mostly tie (e.g. eval accuracies a few examples apart) cannot rank them, so a correlation with it
    says little however narrow its CI."""
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return math.nan
    return float(np.unique(v, return_counts=True)[1].max() / v.size)


def macro_f1(labels, predictions, num_classes: int) -> float:
    """Mean over the `num_classes` classes of F1 = 2·TP / (2·TP + FP + FN); a class with no true and no predicted
    example scores 0 (as scikit-learn's zero_division=0)."""
    y, p = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels has {y.size} values but predictions {p.size}; pass one prediction per label")
    classes = np.arange(num_classes)[:, None]
    tp = np.sum((y == classes) & (p == classes), axis=1)
    wrong = np.sum(y == classes, axis=1) + np.sum(p == classes, axis=1) - 2 * tp  # FN + FP
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0)
    return float(f1.mean())
