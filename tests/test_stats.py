"""jaxlin.stats.correlation against scipy.stats."""
import math

import numpy as np
import pytest
import scipy.stats

from jaxlin.stats import average_ranks, correlation


def test_average_ranks_vs_scipy():
    a = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_array_equal(average_ranks(a), scipy.stats.rankdata(a))


def test_correlation_vs_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=29), 1)  # rounding makes ties
    y = np.round(0.6 * x + rng.normal(scale=0.7, size=29), 1)
    assert len(np.unique(x)) < 29 and len(np.unique(y)) < 29
    out = correlation(x, y, n_bootstrap=1000, seed=1)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0], rel=1e-12)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0], rel=1e-12)
    assert out["n"] == 29 and out["reason"] is None and out["n_bootstrap_valid"] == 1000
    for key in ("pearson", "spearman"):
        lo, hi = out[f"{key}_ci"]
        assert -1 <= lo <= out[key] <= hi <= 1
    assert out == correlation(x, y, n_bootstrap=1000, seed=1)  # seeded
    assert out["pearson_ci"] != correlation(x, y, n_bootstrap=1000, seed=2)["pearson_ci"]


def test_correlation_bootstrap_ci_vs_scipy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = -0.5 * x + rng.normal(size=40)
    out = correlation(x, y, n_bootstrap=2000, confidence=0.9, seed=0)
    ref = scipy.stats.bootstrap((x, y), lambda a, b: scipy.stats.pearsonr(a, b)[0], paired=True,
                                vectorized=False, n_resamples=2000, confidence_level=0.9,
                                method="percentile", random_state=0).confidence_interval
    np.testing.assert_allclose(out["pearson_ci"], [ref.low, ref.high], atol=0.05)  # different resamples


def test_perfect_and_negative():
    x = np.arange(10.0)
    assert correlation(x, x ** 3)["spearman"] == pytest.approx(1.0)
    assert correlation(x, -x)["pearson"] == pytest.approx(-1.0)


@pytest.mark.parametrize("x,y,reason", [
    ([1.0, 2.0], [3.0, 4.0], "at least 3"),
    ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], "x constant"),
    ([1.0, 2.0, 3.0, 4.0], [0.1, 0.1, 0.1, 0.1], "y constant"),
    ([1.0, np.nan, 3.0, np.inf], [1.0, 2.0, 3.0, 4.0], "at least 3"),
])
def test_degenerate_inputs_give_nan_with_reason(x, y, reason):
    out = correlation(x, y)
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])
    assert all(math.isnan(v) for v in out["pearson_ci"] + out["spearman_ci"])
    assert reason in out["reason"]


def test_nonfinite_pairs_dropped():
    x = [1.0, 2.0, np.nan, 4.0, 5.0, 7.0]
    y = [2.0, 1.0, 3.0, 5.0, np.inf, 8.0]
    out = correlation(x, y, n_bootstrap=50)
    assert out["n"] == 4 and out["n_dropped"] == 2
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr([1, 2, 4, 7], [2, 1, 5, 8])[0])


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="x has 3 values but y has 2"):
        correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="confidence=1.5"):
        correlation([1, 2, 3], [1, 2, 3], confidence=1.5)
    with pytest.raises(ValueError, match="n_bootstrap=0"):
        correlation([1, 2, 3], [1, 2, 3], n_bootstrap=0)


def test_group_bootstrap_resamples_whole_groups():
    """Runs that share a configuration share its x: resampling pairs treats 3 copies as 3 data points and gives
    a CI about √3 too narrow; resampling groups gives the CI of the 23 distinct points (prime-ish sizes)."""
    rng = np.random.default_rng(7)
    x23 = rng.normal(size=23)
    y23 = 0.4 * x23 + rng.normal(size=23)
    x, y, g = np.repeat(x23, 3), np.repeat(y23, 3) + 1e-3 * rng.normal(size=69), np.repeat(np.arange(23), 3)
    pairs = correlation(x, y, n_bootstrap=2000, seed=0)
    grouped = correlation(x, y, groups=[f"c{i}" for i in g], n_bootstrap=2000, seed=0)
    distinct = correlation(x23, y23, n_bootstrap=2000, seed=0)
    assert grouped["spearman"] == pairs["spearman"] and grouped["pearson"] == pairs["pearson"]
    assert (pairs["resampling"], pairs["n_groups"]) == ("pairs", 69)
    assert (grouped["resampling"], grouped["n_groups"]) == ("groups", 23)
    width = lambda out: np.diff(out["spearman_ci"])[0]  # noqa: E731
    assert width(grouped) > 1.4 * width(pairs)
    assert width(grouped) == pytest.approx(width(distinct), rel=0.2)
    with pytest.raises(ValueError, match="one label per pair"):
        correlation(x, y, groups=g[:-1])


def test_group_bootstrap_equals_resampling_the_repeated_pairs():
    """The cluster bootstrap counts each pair as often as its group is drawn; against building every resample
    (groups of unequal size, ties within and across groups, resamples with a constant x that are dropped)."""
    rng = np.random.default_rng(13)
    sizes = rng.integers(1, 5, size=11)
    g = np.repeat(np.arange(11), sizes)
    x = np.round(rng.normal(size=g.size), 1)  # rounded: ties
    x[g >= 4] = 0.5  # 7 of the 11 groups share one x: a resample of only those has a constant x
    y = rng.integers(0, 4, size=g.size) + 0.3 * x
    got = correlation(x, y, groups=g, n_bootstrap=997, seed=5)
    order = np.unique(g.astype(str), return_inverse=True)[1]  # group labels are ordered as strings
    members = [np.flatnonzero(order == k) for k in range(11)]
    boot = []
    for chosen in np.random.default_rng(5).integers(0, 11, size=(997, 11)):
        idx = np.concatenate([members[k] for k in chosen])
        xs, ys = x[idx], y[idx]
        boot.append([np.nan, np.nan] if np.ptp(xs) == 0 or np.ptp(ys) == 0 else
                    [np.corrcoef(xs, ys)[0, 1], np.corrcoef(scipy.stats.rankdata(xs), scipy.stats.rankdata(ys))[0, 1]])
    boot = np.array(boot)
    valid = np.isfinite(boot).all(axis=1)
    assert got["n_bootstrap_valid"] == valid.sum() < 997
    np.testing.assert_allclose(got["pearson_ci"], np.percentile(boot[valid, 0], [2.5, 97.5]), rtol=1e-12)
    np.testing.assert_allclose(got["spearman_ci"], np.percentile(boot[valid, 1], [2.5, 97.5]), rtol=1e-12)


def test_modal_tie_fraction_and_macro_f1_vs_sklearn_definition():
    from jaxlin.stats import macro_f1, modal_tie_fraction

    assert modal_tie_fraction([0.78, 0.78, 0.8, 0.78, 0.7]) == pytest.approx(0.6)
    assert modal_tie_fraction([1.0]) == 1.0 and math.isnan(modal_tie_fraction([]))
    rng = np.random.default_rng(11)
    y, p = rng.integers(0, 5, size=97), rng.integers(0, 4, size=97)  # class 4 never predicted
    f1 = []
    for c in range(5):
        tp, fp, fn = np.sum((y == c) & (p == c)), np.sum((y != c) & (p == c)), np.sum((y == c) & (p != c))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    assert macro_f1(y, p, 5) == pytest.approx(np.mean(f1), rel=1e-12)
    assert macro_f1(y, y, 5) == 1.0
