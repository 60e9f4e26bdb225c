"""Matplotlib figures of the report (jaxlin/report.py), one function per figure.

Every function takes validated results sections (jaxlin/schema.py) and returns a `Figure`, or None when nothing
finite is left to draw. Only `Figure` objects with an Agg canvas are used, never pyplot's global state, so this
works headless and from threads. Non-finite values (the strings "inf"/"nan" included) are left out of plots.
"""
from __future__ import annotations

import base64
import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ._util import loglog_slope
from .verdicts import KAPPA, as_float

FIGSIZE = (7.0, 3.8)  # inches; a two-panel figure is WIDE_FIGSIZE
WIDE_FIGSIZE = (9.0, 3.8)
DPI = 150  # rendered pixels per inch; the page shows DISPLAY_PPI CSS pixels per inch, sharp on dense screens
DISPLAY_PPI = 105
FONT_PT = {"label": 9.5, "tick": 8.5, "title": 10.0, "legend": 8.0}  # at DISPLAY_PPI: 8 pt ≈ 12 CSS px
MAX_LOG_LABELS = 6  # labelled ticks on a log axis, so labels never run into each other
MAX_INSIDE_LEGEND = 4  # a legend with more entries goes outside the axes, on the right
MAX_SPECTRA = 12
OUTCOME_LABELS = {"eval_accuracy": "eval accuracy (fraction)", "final_train_loss": "final train loss (cross-entropy)"}
DISTANCES = (("theta_distance_to_init", "‖θ − θ0‖"), ("theta_distance_lin_nonlin", "‖θ − θ̄‖"),
             ("output_distance_lin_nonlin", "‖f − f̄‖ (outputs)"))


def floats(values) -> np.ndarray:
    """Schema numbers (floats or "inf"/"-inf"/"nan") as a float64 array."""
    return np.array([float(v) for v in values], dtype=np.float64)


def fmt(value, digits: int = 3) -> str:
    """A compact string for a schema number: 0.812, 1.23e+04, inf, nan."""
    if isinstance(value, str):
        return value
    v = float(value)
    if not math.isfinite(v) or v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits}g}"
    return f"{v:.{digits - 1}e}"


def display_width(fig: Figure) -> int:
    """The width in CSS pixels at which the page shows `fig` (its inches × `DISPLAY_PPI`)."""
    return round(fig.get_figwidth() * DISPLAY_PPI)


def to_png_base64(fig: Figure) -> str:
    """Render `fig` with Agg to a PNG at `DPI` and return it base64-encoded."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=FIGSIZE if ncols == 1 else WIDE_FIGSIZE, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _tick_label(value, _pos=None, *, plain=True) -> str:
    """With `plain`, 1, 0.02, 500 as they are; otherwise, and outside [1e-3, 1e4), 2×10⁵ and 10⁻⁴ in mathtext."""
    if value <= 0 or not math.isfinite(value):
        return ""
    if plain and 1e-3 <= value < 1e4:
        return f"{value:.4g}"
    exp = math.floor(math.log10(value))
    mant = round(value / 10 ** exp, 2)
    mant = f"{mant:g}" + r"{\times}" if mant != 1 else ""
    return f"${mant}10^{{{exp}}}$"


def _log_ticks(axis, lo: float, hi: float) -> None:
    """At most `MAX_LOG_LABELS` labels on a log axis spanning [lo, hi], none on minor ticks: whole decades over
    two decades or more, 1-2-5 steps over one to two, plain linear steps under one (where no decade falls)."""
    if not (0 < lo < hi and math.isfinite(hi)):
        return
    decades = math.log10(hi / lo)
    if decades >= 2:
        axis.set_major_locator(LogLocator(base=10, numticks=MAX_LOG_LABELS))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_label(v, plain=False)))
        axis.set_minor_formatter(NullFormatter())
        return
    elif decades >= 0.8:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=MAX_LOG_LABELS))
    else:
        axis.set_major_locator(MaxNLocator(nbins=4))
    axis.set_major_formatter(FuncFormatter(_tick_label))
    axis.set_minor_formatter(NullFormatter())


def _finish(fig: Figure, ax, *, xlabel: str, ylabel: str, title: str | None = None, xlog=False, ylog=False,
            legend=True, outside=False) -> Figure:
    """Labels, fonts and tick labels of one axes at their `FONT_PT` sizes; a legend inside at the emptiest spot
    (framed, half-transparent) or, past `MAX_INSIDE_LEGEND` entries or with `outside` (lines that fill the axes),
    outside on the right."""
    ax.set_xlabel(xlabel, fontsize=FONT_PT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT_PT["label"])
    if title is not None:
        ax.set_title(title, fontsize=FONT_PT["title"])
    ax.tick_params(labelsize=FONT_PT["tick"])
    if xlog:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, *ax.get_xlim())
    if ylog:
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, *ax.get_ylim())
    handles, labels = ax.get_legend_handles_labels()
    if legend and handles:
        if outside or len(handles) > MAX_INSIDE_LEGEND:
            ax.legend(handles, labels, fontsize=FONT_PT["legend"], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0, frameon=False, ncols=1 if len(handles) <= 12 else 2)
        else:
            ax.legend(handles, labels, fontsize=FONT_PT["legend"], loc="best", framealpha=0.75)
    return fig


def _positive(x, y):
    """The pairs of x, y where both are finite and positive (for log-log axes)."""
    x, y = floats(x), floats(y)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def spectra_order(spectrum: dict) -> tuple[list[str], list[str]]:
    """The configurations to draw ("all" first, then in order, at most `MAX_SPECTRA`) and those left out."""
    names = sorted(spectrum, key=lambda n: n != "all")
    return names[:MAX_SPECTRA], names[MAX_SPECTRA:]


def spectra(spectrum: dict) -> Figure | None:
    """Eigenvalues (log y) against their index per configuration; "all" drawn thick and black."""
    fig, (ax,) = _figure()
    drawn, drawn_count = False, 0
    for name in spectra_order(spectrum)[0]:
        eig = floats(spectrum[name]["stats"]["eigenvalues"])
        idx = np.arange(1, eig.size + 1)
        keep = np.isfinite(eig) & (eig > 0)
        if not keep.any():
            continue
        shade = (2 * drawn_count) % 20 + drawn_count // 10 % 2  # tab20's ten dark shades, then its light ones
        style = (dict(color="black", lw=2.5, zorder=3) if name == "all" else
                 dict(lw=1, alpha=0.85, color=matplotlib.colormaps["tab20"](shade)))
        drawn_count += 1
        ax.plot(idx[keep], eig[keep], label=name, **style)
        drawn = True
    if not drawn:
        return None
    return _finish(fig, ax, xlabel="index i (eigenvalues in descending order)", ylabel="eigenvalue μ_i (logit²)",
                   title="NTK eigen-spectra", ylog=True)


def _fit_line(ax, x, y):
    """Least-squares line of y against log10 x, drawn over the range of x."""
    slope, intercept = np.polyfit(np.log10(x), y, 1)
    grid = np.geomspace(x.min(), x.max(), 50)
    ax.plot(grid, intercept + slope * np.log10(grid), color="gray", ls="--", lw=1, label=f"fit: slope {slope:.3g}/dec")


def _corr_label(result: dict | None) -> str:
    if not result:
        return "no correlation computed"
    p_lo, p_hi = result["pearson_ci"]
    s_lo, s_hi = result["spearman_ci"]
    return (f"Pearson r={fmt(result['pearson'], 2)} [{fmt(p_lo, 2)}, {fmt(p_hi, 2)}]\n"
            f"Spearman ρ={fmt(result['spearman'], 2)} [{fmt(s_lo, 2)}, {fmt(s_hi, 2)}], n={result['n']}")


def kappa_scatter(correlation: dict) -> Figure | None:
    """κ (log x) against eval accuracy and final train loss, one point per run, with the least-squares line in
    log κ and the Pearson/Spearman r (bootstrap CI) of `correlation.results[kappa]`."""
    runs = [r for r in correlation["runs"] if KAPPA in r["statistics"]]
    kappa = np.array([as_float(r["statistics"][KAPPA]) for r in runs], dtype=np.float64)
    results = correlation["results"].get(KAPPA, {})
    fig, axes = _figure(2)
    drawn = False
    for ax, outcome in zip(axes, ("eval_accuracy", "final_train_loss")):
        y = floats([r[outcome] for r in runs])
        keep = np.isfinite(kappa) & (kappa > 0) & np.isfinite(y)
        x, y = kappa[keep], y[keep]
        if x.size:
            ax.scatter(x, y, s=14, zorder=3, label="runs")
            drawn = True
        if np.unique(x).size >= 2:
            _fit_line(ax, x, y)
        _finish(fig, ax, xlabel="κ = μ_max/μ_min at θ0 (ratio)", ylabel=OUTCOME_LABELS[outcome],
                title=_corr_label(results.get(outcome)), xlog=bool(x.size))
    return fig if drawn else None


def distances(sweep: list, summary: dict) -> Figure | None:
    """Distances against λ (log-log) with the Theorem 2 radius √(2R(θ0)/λ) dashed; slopes in the legend."""
    lambdas = [p["lambda"] for p in sweep]
    fig, (ax,) = _figure()
    drawn = False
    for key, label in DISTANCES + (("theorem2_radius", "Theorem 2 radius √(2R(θ0)/λ)"),):
        x, y = _positive(lambdas, [p[key] for p in sweep])
        if not x.size:
            continue
        slope = summary.get(key, loglog_slope(x, y))
        ax.plot(x, y, ls="--" if key == "theorem2_radius" else "-", marker="o", ms=3,
                color="black" if key == "theorem2_radius" else None, label=f"{label}  slope {fmt(slope, 2)}")
        drawn = True
    if not drawn:
        return None
    return _finish(fig, ax, xlabel="regularisation λ", ylabel="distance (‖θ‖ units; outputs: logits)",
                   title="Distances against regularisation λ", xlog=True, ylog=True)


def loss_curves(sweep: list) -> Figure | None:
    """Training loss per step, nonlinear solid and linearized dashed, one colour per λ."""
    fig, (ax,) = _figure()
    positive, drawn = True, False
    for i, point in enumerate(sweep):
        color = f"C{i % 10}"
        label = f"λ={fmt(point['lambda'], 2)}"
        for key, ls in (("loss_curve_nonlinear", "-"), ("loss_curve_linearized", "--")):
            y = floats(point.get(key, []))
            keep = np.isfinite(y)
            if not keep.any():
                continue
            ax.plot(np.arange(y.size)[keep], y[keep], ls=ls, color=color, lw=1, label=label)
            label = None  # one legend entry per λ
            positive &= bool((y[keep] > 0).all())
            drawn = True
    if not drawn:
        return None
    return _finish(fig, ax, xlabel="step", ylabel="training loss (mean per example)",
                   title="Training loss: nonlinear (solid) vs linearized (dashed)", ylog=positive, outside=True)


def lipschitz(probe: dict) -> Figure | None:
    """L_avg(r) per estimator (line and markers) with the band up to L_upper(r), log-log."""
    fig, (ax,) = _figure()
    drawn = False
    for i, (name, est) in enumerate(probe["estimates"].items()):
        r, avg, upper = floats(probe["radii"]), floats(est["L_avg"]), floats(est["L_upper"])
        if r.size != avg.size:
            continue
        keep = np.isfinite(r) & np.isfinite(avg) & np.isfinite(upper) & (r > 0) & (avg > 0) & (upper > 0)
        if not keep.any():
            continue
        color = f"C{i % 10}"
        ax.plot(r[keep], avg[keep], marker="o", ms=3, color=color, label=f"{name}: L_avg")
        ax.plot(r[keep], upper[keep], ls=":", color=color, label=f"{name}: L_upper")
        ax.fill_between(r[keep], avg[keep], upper[keep], color=color, alpha=0.15)
        drawn = True
    if not drawn:
        return None
    return _finish(fig, ax, xlabel="radius r = ‖θ − θ0‖ (parameter norm)",
                   ylabel="Lipschitz estimate (Jacobian change per unit r)", title="Linearity probe (Algorithm 1)",
                   xlog=True, ylog=True)


def dynamics(dyn: dict) -> Figure | None:
    """Closed-form linearized GD loss against the measured linearized and nonlinear training curves."""
    steps = floats(dyn["steps"])
    fig, (ax,) = _figure()
    positive, drawn = True, False
    for key, style, label in (("predicted_loss", dict(color="black", lw=2), "predicted (closed form)"),
                              ("measured_loss_linearized", dict(ls="--", marker="o", ms=3), "measured, linearized"),
                              ("measured_loss_nonlinear", dict(ls=":", marker="s", ms=3), "measured, nonlinear")):
        y = floats(dyn[key])
        keep = np.isfinite(y)
        if not keep.any():
            continue
        ax.plot(steps[keep], y[keep], label=label, **style)
        positive &= bool((y[keep] > 0).all())
        drawn = True
    if not drawn:
        return None
    return _finish(fig, ax, xlabel="step", ylabel="training loss (squared)",
                   title=f"GD dynamics (η={fmt(dyn['learning_rate'])}, λ={fmt(dyn['ridge'])})", ylog=positive)


def krr(section: dict) -> Figure | None:
    """Kernel-ridge eval and train accuracy against the ridge λ (log x); the best eval λ marked."""
    ridges = floats(section["ridges"])
    fig, (ax,) = _figure()
    drawn = False
    for key, marker in (("eval_accuracy", "o"), ("train_accuracy", "s")):
        y = floats(section[key])
        keep = np.isfinite(ridges) & (ridges > 0) & np.isfinite(y)
        if keep.any():
            ax.plot(ridges[keep], y[keep], marker=marker, ms=3, label=key.replace("_", " "))
            drawn = True
    if not drawn:
        return None
    best = best_krr(section)
    if best is not None:
        ax.axvline(best[0], color="gray", ls=":", lw=1, label=f"best eval λ={fmt(best[0])}")
    return _finish(fig, ax, xlabel=f"ridge λ ({section['ridge_scale']} units)", ylabel="accuracy (fraction)",
                   title=f"Kernel ridge regression on '{section['configuration']}'", xlog=True)


def best_krr(section: dict) -> tuple[float, float] | None:
    """(ridge, eval accuracy) of the best finite eval accuracy, or None when there is none."""
    pairs = [(r, a) for r, a in zip(floats(section["ridges"]), floats(section["eval_accuracy"]))
             if math.isfinite(a) and math.isfinite(r)]
    return max(pairs, key=lambda p: p[1]) if pairs else None
