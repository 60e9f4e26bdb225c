"""The HTML report of a `jaxlin run` output directory, and the few summary lines the CLI prints.

`render_report(results_dir)` reads `results.json` (validated against jaxlin/schema.py) and, when present, the
arrays file it names, and writes one self-contained HTML page: inline CSS, figures as base64 PNGs, no scripts
and no external assets. Every figure and table carries a stable `id` (`FIGURE_IDS`, `TABLE_IDS`); a section that
is missing, empty or skipped shows a short note instead. All text from the results is HTML-escaped.
"""
from __future__ import annotations

import html
import itertools
import json
import math
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _plots, verdicts
from .rundir import atomic_write
from .schema import SchemaError, is_skipped, validate_results
from .stats import modal_tie_fraction

RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
FIGURE_IDS = ("fig-spectra", "fig-kappa-scatter", "fig-distances", "fig-loss-curves", "fig-lipschitz",
              "fig-dynamics", "fig-krr")
TABLE_IDS = ("table-verdicts", "table-headline", "table-glance", "table-spectrum", "table-correlation",
             "table-study-configurations", "table-sweep", "table-selection", "table-config")
MAX_SCORES_SHOWN = 8
HEADLINE_OUTCOMES = ("eval_accuracy", "eval_macro_f1", "final_train_loss")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:12px}td,th{border:1px solid #ddd;padding:2px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.8em 0}figcaption{font-size:12px;color:#555}img{max-width:100%}
.note{color:#8a5a00;background:#fff6e0;padding:4px 8px;border-left:3px solid #e0a800}
.grid{display:flex;flex-wrap:wrap;gap:0 2em}h3{font-size:1em;margin-top:1.2em}
td.verdict{font-weight:600;white-space:nowrap}td.supported{background:#e3f4e1}td.not-supported{background:#fbe3e1}
td.inconclusive{background:#f1f1f1}p.rule{font-size:12px;color:#444;max-width:60em}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(rows, headers, table_id: str | None = None, numeric: tuple[int, ...] = ()) -> str:
    """An HTML table; `numeric` names the columns aligned right. Every cell is escaped."""
    ident = f' id="{_esc(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table{ident}>{head}<tbody>{body}</tbody></table>"


def _missing_note(results: dict, key: str) -> str | None:
    """Why section `key` cannot be drawn (missing, skipped, empty), or None when it has data."""
    section = results.get(key)
    if section is None:
        return f"No '{key}' section in this run."
    if isinstance(section, dict) and "skipped" in section:
        return f"Stage '{key}' was skipped: {section['skipped']}"
    if len(section) == 0:
        if key not in results.get("config", {}).get("stages", (key,)):  # an empty list: the sweep not run
            return f"Stage '{key}' was skipped: stage not run (see config.stages)"
        return f"Stage '{key}' produced no data (skipped or not configured)."
    return None


def _figure(fig_id: str, fig, caption: str, note: str | None) -> str:
    """A <figure> holding the PNG of `fig`, or the note when there is no figure."""
    if fig is None:
        return f'<div id="{fig_id}">{_note(note or "Nothing finite to plot.")}</div>'
    img = (f'<img alt="{_esc(caption)}" width="{_plots.display_width(fig)}" '
           f'src="data:image/png;base64,{_plots.to_png_base64(fig)}">')
    extra = f"<br>{_esc(note)}" if note else ""
    return f'<figure id="{fig_id}">{img}<figcaption>{_esc(caption)}{extra}</figcaption></figure>'


def _spectra_figure(results: dict) -> str:
    note = _missing_note(results, "spectrum")
    if note:
        return _figure("fig-spectra", None, "", note)
    left_out = _plots.spectra_order(results["spectrum"])[1]
    extra = (f"{len(left_out)} more configurations are in the table at the end: {', '.join(left_out)}."
             if left_out else None)
    return _figure("fig-spectra", _plots.spectra(results["spectrum"]),
                   'Eigenvalues of the empirical NTK per configuration (positive ones, log scale); "all" in black.',
                   extra)


def _spectra_table(results: dict) -> str:
    note = _missing_note(results, "spectrum")
    if note:
        return f'<div id="table-spectrum">{_note(note)}</div>'
    rows = [(name, c["family"], len(c["modules"]), *(_plots.fmt(c["stats"][k]) for k in (
        "kappa", "kappa_sigma_abs", "kappa_sigma_trace", "mu_max", "mu_min", "trace", "effective_rank",
        "stable_rank"))) for name, c in results["spectrum"].items()]
    return _table(rows, ("configuration", "family", "modules", "κ", "κ_σ (absolute σ)", "κ_σ (σ·trace/n)",
                         "μ_max", "μ_min", "trace", "eff. rank", "stable rank"), "table-spectrum", numeric=tuple(range(2, 11)))


def _fine_tuned(objective: str | None) -> str:
    """How a fine-tuning stage trained, from its recorded objective (docs/results-schema.md, readout): the one
    wording of the sweep's and the study's rows."""
    return "fine-tuned on the next-token loss" if objective == "next_token" else "fine-tuned"


def _study_objective_note(results: dict) -> str:
    """A line saying the study's losses are next-token losses when it trained `next_token`, else nothing."""
    readout = results.get("readout") or {}
    objective = (readout.get("stage_objectives") or {}).get("study", readout.get("objective"))
    if objective != "next_token":
        return ""
    return (f"<p>The study's runs were {_fine_tuned(objective)}: their final train loss and eval loss are the "
            "LM's next-token cross-entropy of the label word; eval accuracy is the readout's argmax.</p>")


def _correlation_figure(results: dict) -> str:
    note = _missing_note(results, "correlation")
    if note:
        return _figure("fig-kappa-scatter", None, "", note)
    corr = results["correlation"]
    figure = _figure("fig-kappa-scatter", _plots.kappa_scatter(corr) if corr["runs"] else None,
                   "κ at init against the fine-tuning outcome, one point per run, least-squares line in log κ; "
                   "bootstrap CIs in brackets. The paper expects lower κ ↔ higher accuracy, lower loss.",
                   None if corr["runs"] else "No runs recorded.")
    return _study_objective_note(results) + figure


def _correlation_table(results: dict) -> str:
    note = _missing_note(results, "correlation")
    if note:
        return f'<div id="table-correlation">{_note(note)}</div>'
    rows = []
    for stat, outcomes in results["correlation"]["results"].items():
        for outcome, r in outcomes.items():
            rows.append((stat, outcome, _plots.fmt(r["pearson"]), _ci(r["pearson_ci"]), _plots.fmt(r["spearman"]),
                         _ci(r["spearman_ci"]), r["n"], r.get("reason") or ""))
    return _table(rows, ("statistic", "outcome", "Pearson r", "CI", "Spearman ρ", "CI", "n", "note"),
                  "table-correlation", numeric=(2, 3, 4, 5, 6))


def _study_configurations_table(results: dict) -> str:
    """The study's runs averaged per configuration: seeds, κ, outcomes and the KRR predictor's accuracy."""
    note = _missing_note(results, "correlation")
    runs = [] if note else results["correlation"]["runs"]
    if not runs:
        return f'<div id="table-study-configurations">{_note(note or "No runs recorded.")}</div>'
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run["configuration"], []).append(run)

    def mean(rs, get):
        v = [x for x in (verdicts.as_float(get(r)) for r in rs) if math.isfinite(x)]
        return _plots.fmt(float(np.mean(v))) if v else "—"

    rows = [(name, len(rs[0]["modules"]), len(rs), mean(rs, lambda r: r["statistics"].get(verdicts.KAPPA)),
             mean(rs, lambda r: r["final_train_loss"]), mean(rs, lambda r: r["eval_accuracy"]),
             mean(rs, lambda r: r.get("eval_macro_f1")), mean(rs, lambda r: r.get("krr_eval_accuracy")),
             mean(rs, lambda r: r.get("krr_agreement"))) for name, rs in groups.items()]
    return _table(rows, ("configuration", "modules", "seeds", "κ", "final train loss", "eval accuracy",
                         "eval macro-F1", "KRR eval accuracy", "KRR agreement"), "table-study-configurations",
                  numeric=tuple(range(1, 9)))


def _ci(pair) -> str:
    return f"[{_plots.fmt(pair[0], 2)}, {_plots.fmt(pair[1], 2)}]"


def _sweep_figures(results: dict) -> str:
    note = _missing_note(results, "sweep")
    if note:
        return _figure("fig-distances", None, "", note) + _figure("fig-loss-curves", None, "", note)
    sweep = results["sweep"]
    summary = results.get("sweep_summary")
    summary = {} if is_skipped(summary) else summary
    distances = _figure("fig-distances", _plots.distances(sweep, summary),
                        "Distances after fine-tuning against λ (log-log); dashed: the candidate Theorem 2 radius "
                        "√(2R(θ0)/λ) (slope −1/2). Slopes from sweep_summary (or fitted here).", None)
    has_curves = any("loss_curve_nonlinear" in p or "loss_curve_linearized" in p for p in sweep)
    curves = _figure("fig-loss-curves", _plots.loss_curves(sweep) if has_curves else None,
                     "Training loss per step: nonlinear (solid) and linearized (dashed) fine-tuning, "
                     "one colour per λ.",
                     None if has_curves else "The sweep recorded no loss curves.")
    return distances + curves


def _sweep_table(results: dict) -> str:
    note = _missing_note(results, "sweep")
    if note:
        return f'<div id="table-sweep">{_note(note)}</div>'
    rows = [(_plots.fmt(p["lambda"]), _plots.fmt(p["eval_accuracy_nonlinear"]),
             _plots.fmt(p["eval_accuracy_linearized"]), _plots.fmt(p["theorem2_radius"])) for p in results["sweep"]]
    return _table(rows, ("λ", "eval acc. nonlinear", "eval acc. linearized", "Theorem 2 radius"), "table-sweep",
                  numeric=(0, 1, 2, 3))


def _simple_figure(results: dict, key: str, fig_id: str, plot, caption: str) -> str:
    note = _missing_note(results, key)
    return _figure(fig_id, None if note else plot(results[key]), caption, note)


def _selection_section(results: dict) -> str:
    """The spectrum stage's selections with the study's outcomes beside them; without the spectrum stage, the
    study's own selections (chosen on the study's calibration kernels)."""
    note = _missing_note(results, "selection")
    study = _study_selection(results)
    if note and not study:
        return f'<div id="table-selection">{_note(note)}</div>'
    sel = study if note else results["selection"]
    trained = study.get("methods", {})
    rows = []
    for method, m in sel["methods"].items():
        scores = m.get("scores", [])
        shown = ", ".join(_plots.fmt(s) for s in scores[:MAX_SCORES_SHOWN])
        shown += f", … ({len(scores)} in all)" if len(scores) > MAX_SCORES_SHOWN else ""
        run = trained.get(method, {}) if trained.get(method, {}).get("modules") == m["modules"] else {}
        rows.append((method, ", ".join(m["modules"]), shown, _plots.fmt(run.get("final_train_loss", "")),
                     _plots.fmt(run.get("eval_accuracy", ""))))
    sigma = (f" σ = {_plots.fmt(sel['sigma'])} ({_esc(sel['sigma_scale'])})." if "sigma_scale" in sel else "")
    source = ("The study's selections, on its calibration kernels (the spectrum stage did not run). " if note
              else "")
    untrained = ("" if not study or any("eval_accuracy" in m for m in trained.values()) else
                 " This study did not train them (study.train_selections).")
    return (f"<p>{source}Budget: {_esc(sel['budget'])} modules.{sigma} Outcomes are the study's runs of the same "
            f"module set, when it trained one.{untrained}</p>" +
            _table(rows, ("method", "modules", "scores", "final train loss", "eval accuracy"), "table-selection",
                   numeric=(3, 4)))


def _study_selection(results: dict) -> dict:
    """The study's selection (methods: modules, scores and, when trained, outcomes); {} without a study."""
    corr = results["correlation"]
    return {} if is_skipped(corr) else corr.get("selection", {})


def _title(results: dict) -> str:
    """The page title and what was measured on what: preset, model, data."""
    model, data = results["model"], results["data"]
    facts = [("preset", results["config"]["preset"]),
             ("model", f"{model['source']} ({model['family']}, {model['num_layers']} layers, "
                       f"{len(model['modules'])} adaptable modules, {model['num_trainable_params']:,} trainable)"),
             ("data", _data_facts(data))]
    corr = results.get("correlation", {})
    study = corr.get("data") if isinstance(corr, dict) and not is_skipped(corr) else None
    if study is not None and study["dataset"] != data["dataset"]:  # study.dataset: the study ran on its own
        facts.append(("study data", _data_facts(study)))
    return f"<h1>jaxlin report: {_esc(results['config']['preset'])}</h1>" + _table(facts, ("", ""), "table-facts")


def _data_facts(data: dict) -> str:
    return (f"{data['dataset']}: {data['num_train']} train, {data['num_eval']} eval, {data['num_calibration']} "
            f"calibration; labels {', '.join(data['label_names'])}")


def _run_details(results: dict, arrays: dict | None) -> str:
    """Environment, timings, variants, the whole configuration and the arrays file: the end of the page."""
    env = results["environment"]
    facts = [("device", f"{env['platform']}: {', '.join(env['devices'])}; x64={env['x64']}"),
             ("versions", f"jaxlin {env['jaxlin']}, JAX {env['jax']} (jaxlib {env['jaxlib']}), flax {env['flax']}, "
                          f"optax {env['optax']}, Python {env['python']}"),
             ("schema", results["schema"])]
    timings = [(stage, _plots.fmt(sec)) for stage, sec in results["timings"].items()]
    total = sum(float(s) for s in results["timings"].values() if math.isfinite(float(s)))
    config = [(k, json.dumps(v, ensure_ascii=False)) for k, v in _dotted(results["config"])]
    return "".join([
        "<h2>Run details</h2>", _table(facts, ("", ""), "table-environment"),
        '<div class="grid"><div><h3>Timings (s)</h3>',
        _table(timings + [("total", _plots.fmt(total))], ("stage", "seconds"), "table-timings", numeric=(1,)),
        "</div><div><h3>Variants</h3>",
        _table(results["variants"].items(), ("choice", "value"), "table-variants"), "</div></div>",
        "<h3>Configuration</h3>", _table(config, ("key", "value"), "table-config"),
        _arrays_block(results["arrays"], arrays)])


def _verdicts_section(results: dict) -> str:
    """The claims, each with its verdict, the statistic and interval it rests on, and the model and data; the rule
    of jaxlin/verdicts.py spelled out under the table."""
    head = "".join(f"<th>{h}</th>" for h in ("claim", "test", "verdict", "statistic [95% CI], n", "why",
                                               "model and data"))
    body, rows = [], verdicts.verdict_rows(results)
    for i, row in enumerate(rows):
        why = row["reason"] + (f"; {row['run']}" if row["run"] else "")
        css = row["verdict"].replace(" ", "-")
        span = sum(1 for _ in itertools.takewhile(lambda r: r["claim"] == row["claim"], rows[i:]))
        claim = ("" if i and rows[i - 1]["claim"] == row["claim"] else  # one cell per claim, over its tests
                 f'<td rowspan="{span}">{_esc(row["claim"])}</td>')
        body.append(f"<tr>{claim}<td>{_esc(row['test'])}</td>"
                    f'<td class="verdict {css}">{_esc(row["verdict"])}</td><td>{_esc(row["statistic"])}</td>'
                    f"<td>{_esc(why)}</td><td>{_esc(row['source'])}</td></tr>")
    rule = ("Rule (jaxlin.verdicts, docs/results-schema.md): a claim is <b>supported</b> when the "
            f"{verdicts.CONFIDENCE:.0%} interval of its statistic excludes 0 with the predicted sign, <b>not supported</b> when it excludes 0 "
            f"with the other sign or lies within ±{verdicts.CORRELATION_NULL_BAND:g} (Spearman ρ; "
            f"±{verdicts.SLOPE_NULL_BAND:g} for a log-log slope), and <b>inconclusive</b> otherwise, and always "
            f"when more than {verdicts.MAX_TIE_FRACTION:.0%} of the runs tie at the modal eval accuracy or fewer "
            f"than {verdicts.MIN_UNITS} independent units (configurations under a cluster bootstrap, else runs; "
            f"{verdicts.MIN_LAMBDAS} λ values for a slope) stand behind it. Claim (c) asks for agreement: supported "
            f"when the interval of the accuracy difference lies within ±{verdicts.ACCURACY_MARGIN:g}, not supported "
            "when it lies wholly beyond. Computed from this results file only.")
    return (f'<h2>Verdicts</h2><table id="table-verdicts"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            f'</tbody></table><p class="rule">{rule}</p>')


def _kernel_stats(results: dict) -> dict | None:
    """The spectral statistics of K(all) at θ0, or None when the spectrum stage did not run."""
    spectrum = results["spectrum"]
    return spectrum["all"]["stats"] if not is_skipped(spectrum) and "all" in spectrum else None


def _best_tuned(results: dict) -> tuple[float, dict] | None:
    """(eval accuracy, sweep point) of the λ whose nonlinear fine-tuned model scored best, or None."""
    tuned = [(verdicts.as_float(p.get("eval_accuracy_nonlinear")), p) for p in results["sweep"]]
    tuned = [t for t in tuned if math.isfinite(t[0])]
    return max(tuned, key=lambda t: t[0]) if tuned else None


def _readout_text(readout: dict | None) -> str:
    """How the run read a class score, in words."""
    if readout is None:
        return "the classification head"
    if readout["kind"] == "label_words":
        return f"label words {', '.join(readout['label_words'])} after {readout['template']!r}"
    return (f"{readout.get('head', 'head')} head" + ("" if readout["trained"] else " (not trained)")
            + (f" after {readout['template']!r}" if readout.get("template") else ""))


def _headline_section(results: dict) -> str:
    """The numbers behind the verdicts, one line each: κ, the KRR and fine-tuned accuracies, the sweep slopes and
    the study's correlations with their CIs."""
    rows = []
    st = _kernel_stats(results)
    if st is not None:
        rows.append(("κ = μ_max/μ_min of K(all) at θ0", _plots.fmt(st["kappa"]),
                     f"μ_max = {_plots.fmt(st['mu_max'])}, μ_min = {_plots.fmt(st['mu_min'])}, "
                     f"κ_σ (σ·trace/n) = {_plots.fmt(st['kappa_sigma_trace'])}"))
    best = None if is_skipped(results["krr"]) else _plots.best_krr(results["krr"])
    if best is not None:
        rows.append(("KRR eval accuracy (best ridge)", _plots.fmt(best[1]), f"λ = {_plots.fmt(best[0])}, no training"))
    tuned = _best_tuned(results)
    if tuned is not None:  # every λ is in the table below
        acc, p = tuned
        rows.append(("fine-tuned eval accuracy (best λ)", _plots.fmt(acc),
                     f"λ = {_plots.fmt(p['lambda'])}; linearized at that λ: "
                     f"{_maybe(p.get('eval_accuracy_linearized'))}"))
    summary = results.get("sweep_summary")
    for key, slope in ({} if summary is None or is_skipped(summary) else summary).items():
        rows.append((f"log-log slope of {key} against λ", _plots.fmt(slope, 2), "sweep_summary"))
    corr = results["correlation"]
    runs = [] if is_skipped(corr) else corr["runs"]
    for predictor in (verdicts.KAPPA, "krr_eval_accuracy"):  # every other pair is in the table at the end
        found = {} if is_skipped(corr) else corr["results"].get(predictor, {})
        for outcome, r in ((o, found[o]) for o in HEADLINE_OUTCOMES if o in found):
            rows.append((f"Spearman({predictor}, {outcome})", _plots.fmt(r["spearman"], 2),
                         f"95% CI {_ci(r['spearman_ci'])}, n = {r['n']}" + (f"; {r['reason']}" if r.get("reason")
                                                                            else "")))
    if runs:
        acc = [verdicts.as_float(r["eval_accuracy"]) for r in runs]
        rows.append(("modal-tie fraction of the study's eval accuracy", _plots.fmt(modal_tie_fraction(acc), 2),
                     f"{len(runs)} runs; above {verdicts.MAX_TIE_FRACTION:g} the accuracy correlations rank ties"))
    if not rows:
        note = _note("No stage with a headline number ran.")
        return f'<h2>Headline numbers</h2><div id="table-headline">{note}</div>'
    return "<h2>Headline numbers</h2>" + _table(rows, ("quantity", "value", "detail"), "table-headline", numeric=(1,))


def _glance_section(results: dict) -> str:
    """One table of eval accuracies: at θ0 (the readout's zero-shot), the kernel predictor's best, and fine-tuned
    nonlinear and linearized at each λ with how far apart the two models end (RMS logit distance, KL)."""
    readout = results.get("readout")
    rows = []
    if readout is not None and readout["zero_shot_num_eval"]:  # measured by the krr stage, when it ran
        rows.append(("at θ0 (zero-shot), " + _readout_text(readout), _maybe(readout["zero_shot_eval_accuracy"]), "",
                     f"{readout['zero_shot_num_eval']} eval examples"))
    best = None if is_skipped(results["krr"]) else _plots.best_krr(results["krr"])
    if best is not None:
        rows.append((f"KRR with the model's eNTK, λ = {_plots.fmt(best[0])}", _plots.fmt(best[1]), "",
                     f"{results['krr'].get('num_eval', '?')} eval examples, no training"))
    for r in results["sweep"]:
        rows.append((f"{_fine_tuned(r.get('objective'))}, λ = {_plots.fmt(r['lambda'])}",
                     _maybe(r.get("eval_accuracy_nonlinear")), _maybe(r.get("eval_accuracy_linearized")),
                     f"‖f − f̄‖ = {_maybe(r.get('output_distance_lin_nonlin_eval'))}, "
                     f"KL = {_maybe(r.get('kl_nonlin_lin'))}"))
    if not rows:
        return ""
    return "<h2>Eval accuracy at a glance</h2>" + _table(rows, ("predictor", "accuracy (nonlinear)",
                                                                 "accuracy (linearized)", "note"),
                                                         "table-glance", numeric=(1, 2))


def _comparison_section(results: dict, compared: Sequence[tuple[str, dict]]) -> str:
    """This run next to other runs (`jaxlin report DIR --compare OTHER`), one row each: the readout, κ and μ_max of
    K(all), zero-shot, best KRR and fine-tuned accuracies, the eval accuracy of both fine-tuned models at every λ,
    and Spearman(κ, eval accuracy) of the study; a note when the runs' data or model differ."""
    if not compared:
        return ""
    runs = [("this run", results), *compared]
    rows = []
    for label, r in runs:
        st, tuned, readout = _kernel_stats(r), _best_tuned(r), r.get("readout")
        best = None if is_skipped(r["krr"]) else _plots.best_krr(r["krr"])
        corr = r["correlation"]
        spearman = None if is_skipped(corr) else corr["results"].get(verdicts.KAPPA, {}).get("eval_accuracy")
        per_lambda = "; ".join(f"{_plots.fmt(p['lambda'])}: {_maybe(p.get('eval_accuracy_nonlinear'))} / "
                               f"{_maybe(p.get('eval_accuracy_linearized'))}" for p in r["sweep"])
        rows.append((f"{label}: {_readout_text(readout)}",
                     "—" if st is None else _plots.fmt(st["kappa"]), "—" if st is None else _plots.fmt(st["mu_max"]),
                     "—" if readout is None else _maybe(readout["zero_shot_eval_accuracy"]),
                     "—" if best is None else f"{_plots.fmt(best[1])} (λ = {_plots.fmt(best[0])})",
                     "—" if tuned is None else f"{_plots.fmt(tuned[0])} (λ = {_plots.fmt(tuned[1]['lambda'])})",
                     per_lambda or "—",
                     "—" if spearman is None else f"{_plots.fmt(spearman['spearman'], 2)} {_ci(spearman['spearman_ci'])}, "
                                                  f"n = {spearman['n']}"))
    facts = {(r["model"]["source"], r["data"]["dataset"], r["data"]["num_train"], r["data"]["num_eval"])
             for _, r in runs}
    note = ("" if len(facts) == 1 else _note("The compared runs differ in model or data (" + "; ".join(
        f"{label}: {r['model']['source']}, {r['data']['dataset']} {r['data']['num_train']}/{r['data']['num_eval']}"
        for label, r in runs) + "): their numbers are not a like-for-like comparison."))
    return ("<h2>Compared runs</h2>" + note
            + _table(rows, ("run, readout", "κ of K(all)", "μ_max", "zero-shot", "KRR (best)", "fine-tuned (best)",
                            "eval accuracy per λ: nonlinear / linearized", "Spearman(κ, eval accuracy) [95% CI]"),
                     "table-compared", numeric=(1, 2, 3)))


def _maybe(value) -> str:
    return "—" if value is None else _plots.fmt(value)


def _dotted(config: dict, prefix: str = ""):
    """(dotted key, value) of a config dict: sections (dicts) are opened, ``lora.rank``; a flat one is as is."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _arrays_block(name: str, arrays: dict | None) -> str:
    if arrays is None:
        return _note(f"Arrays file {name!r} not found beside results.json.")
    rows = [(k, "×".join(map(str, shape)) or "scalar", dtype) for k, (shape, dtype) in arrays.items()]
    return f"<details><summary>{_esc(name)}: {len(rows)} arrays</summary>{_table(rows, ('name', 'shape', 'dtype'))}" \
           "</details>"


def render_html(results: dict, arrays: dict | None = None, compared: Sequence[tuple[str, dict]] = ()) -> str:
    """The report page for a validated results dict; `arrays` maps array names to (shape, dtype) or is None
    when no arrays file was found; `compared`: (label, results) of other runs shown next to this one. Order: the
    answers (verdicts, headline numbers, accuracies at a glance, compared runs), the figures, then the long tables
    and the run's configuration."""
    body = [
        _title(results), _verdicts_section(results), _headline_section(results), _glance_section(results),
        _comparison_section(results, compared),
        "<h2>NTK spectra</h2>", _spectra_figure(results),
        "<h2>Does κ predict fine-tuning?</h2>", _correlation_figure(results),
        "<h2>Kernel ridge regression</h2>",
        _simple_figure(results, "krr", "fig-krr", _plots.krr,
                       "Accuracy of the NTK kernel predictor f0 + K(x,X)(K+λI)⁻¹r0 against the ridge λ."),
        "<h2>Linearized GD dynamics</h2>",
        _simple_figure(results, "dynamics", "fig-dynamics", _plots.dynamics,
                       "Closed-form loss of linearized gradient descent against measured training curves."),
        "<h2>λ sweep: nonlinear vs linearized fine-tuning</h2>", _sweep_figures(results),
        "<h2>Linearity probe</h2>",
        _simple_figure(results, "probe", "fig-lipschitz", _plots.lipschitz,
                       "Lipschitz estimates of the Jacobian at radius r: L_avg (line) up to L_upper (dotted, band)."),
        '<h2 id="tables">Tables</h2>',
        "<h3>Spectral statistics per configuration</h3>", _spectra_table(results),
        "<h3>Correlations of the study</h3>", _correlation_table(results),
        "<h3>The study per configuration (means over seeds)</h3>", _study_configurations_table(results),
        "<h3>λ sweep</h3>", _sweep_table(results),
        "<h3>Layer selection</h3>", _selection_section(results),
        _run_details(results, arrays),
    ]
    title = _esc(f"jaxlin report: {results['config']['preset']}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


class ResultsError(ValueError):
    """A results directory cannot be read: missing, empty or damaged files; the message says what to do."""


class ResultsNotFoundError(ResultsError, FileNotFoundError):
    """The directory or its results.json does not exist."""


def load_results(results_dir) -> tuple[dict, dict | None]:
    """Read and validate `<results_dir>/results.json`; also list the arrays file it names (name → (shape,
    dtype)), or None when that file is absent. Raises ResultsError (ResultsNotFoundError when missing) or
    SchemaError, each naming the file."""
    directory = Path(results_dir)
    path = directory / RESULTS_NAME
    if not directory.is_dir():
        raise ResultsNotFoundError(f"{directory} is not a directory; pass the output directory of `jaxlin run`")
    if not path.is_file():
        raise ResultsNotFoundError(f"{path} not found; pass the output directory of a finished `jaxlin run` "
                                   "(rerun it with --resume if it was interrupted)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path} is not valid JSON ({err}); rerun `jaxlin run` to rewrite it") from None
    try:
        validate_results(results)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from None
    npz = directory / results["arrays"]
    if not npz.is_file():
        return results, None
    try:
        with np.load(npz, allow_pickle=False) as f:
            return results, {k: (f[k].shape, str(f[k].dtype)) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ResultsError(f"{npz} is damaged ({type(err).__name__}); rerun `jaxlin run` to rewrite it, or "
                           "delete it to render the report without arrays") from None


def render_report(results_dir, *, out_name: str = REPORT_NAME, compare: Sequence = ()) -> Path:
    """Write the self-contained HTML report of `results_dir` (holding results.json) to `results_dir/out_name`
    (atomically) and return its path. `compare`: other results directories, shown next to this run in a
    "Compared runs" table (e.g. the same preset with another readout)."""
    results, arrays = load_results(results_dir)
    compared = [(Path(d).name or str(d), load_results(d)[0]) for d in compare]
    return write_report(results_dir, results, arrays, out_name=out_name, compared=compared)


def write_report(results_dir, results: dict, arrays: dict | None, *, out_name: str = REPORT_NAME,
                 compared: Sequence[tuple[str, dict]] = ()) -> Path:
    """Write the page of a validated `results` dict (`arrays`: name → (shape, dtype), as `load_results` gives)
    to `results_dir/out_name` atomically and return its path; `jaxlin run` calls it before writing results.json."""
    out = Path(results_dir) / out_name
    page = render_html(results, arrays, compared).encode("utf-8")
    atomic_write(out, lambda f: f.write(page))
    return out


def _summary_lines(results: dict):
    """(stage, line) pairs: the stage whose result each line reports."""
    spectrum = results["spectrum"]
    if is_skipped(spectrum) or "all" not in spectrum:
        yield "spectrum", f"κ(all): {_missing_note(results, 'spectrum') or 'no configuration named all'}"
    else:
        stats = spectrum["all"]["stats"]
        yield "spectrum", (f"κ(all) = {_plots.fmt(stats['kappa'])} (κ_σ = {_plots.fmt(stats['kappa_sigma_trace'])} "
                           f"at σ·trace/n, μ_max = {_plots.fmt(stats['mu_max'])}, "
                           f"eff. rank = {_plots.fmt(stats['effective_rank'])})")
    best = None if is_skipped(results["krr"]) else _plots.best_krr(results["krr"])
    if best is None:
        yield "krr", f"KRR: {_missing_note(results, 'krr') or 'no finite eval accuracy'}"
    else:
        yield "krr", (f"KRR best eval accuracy {_plots.fmt(best[1])} at λ = {_plots.fmt(best[0])} "
                      f"({results['krr']['ridge_scale']})")
    summary = results.get("sweep_summary")
    yield "sweep", ("sweep slopes vs λ: " + ", ".join(f"{k} {_plots.fmt(v, 2)}" for k, v in summary.items())
                    if not is_skipped(summary) else f"sweep slopes: none ({len(results['sweep'])} λ values)")
    corr = results["correlation"]
    kappa_corr = {} if is_skipped(corr) else corr["results"].get(verdicts.KAPPA, {})
    for outcome, r in kappa_corr.items():
        yield "study", (f"corr(κ, {outcome}): Pearson r = {_plots.fmt(r['pearson'], 2)} {_ci(r['pearson_ci'])}, "
                        f"Spearman ρ = {_plots.fmt(r['spearman'], 2)} {_ci(r['spearman_ci'])}, n = {r['n']}")
    krr = {} if is_skipped(corr) else corr["results"].get("krr_eval_accuracy", {}).get("eval_accuracy")
    if krr:  # H3 of docs/study-design.md: the no-training kernel regressor against fine-tuning
        agree = [a for a in (float(r.get("krr_agreement", math.nan)) for r in corr["runs"]) if math.isfinite(a)]
        yield "study", (f"corr(KRR eval accuracy, eval_accuracy): Spearman ρ = {_plots.fmt(krr['spearman'], 2)} "
                        f"{_ci(krr['spearman_ci'])}, n = {krr['n']}; mean KRR–fine-tuned agreement "
                        f"{_plots.fmt(np.mean(agree) if agree else math.nan)}")
    if not is_skipped(results["selection"]):
        for method, m in results["selection"]["methods"].items():
            yield "spectrum", f"selection {method}: {', '.join(m['modules'])}"


def _stages_line(records: dict) -> str:
    return "stages: " + ", ".join(f"{name} ({'reused, computed' if r['reused'] else 'done'} in {r['seconds']:.1f} s)"
                                  for name, r in records.items())


def summary_text(results: dict, stages=None) -> str:
    """A few lines for the end of `jaxlin run`: κ of "all", best KRR accuracy, sweep slopes, the correlation
    of κ with the outcomes and the modules each selection method chose. With `stages` (the names of the stages
    that ran) only their lines, after one line on how each was obtained. Validates `results` first."""
    validate_results(results)
    lines = [line for stage, line in _summary_lines(results) if stages is None or stage in stages]
    ran = {k: v for k, v in results.get("stages", {}).items() if stages is not None and k in stages}
    if ran:
        lines.insert(0, _stages_line(ran))
    return "\n".join(lines)
