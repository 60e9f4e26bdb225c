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
        r["krr"]["eval_accuracy"] = ["nan"] * 6
        r["krr"]["train_accuracy"] = ["inf"] * 6
        for c in r["spectrum"].values():
            c["stats"]["eigenvalues"] = [0.0] * len(c["stats"]["eigenvalues"])
    page = render_report(_write(tmp_path, _mutated(example, mutate))).read_text()
    assert "Stage &#x27;sweep&#x27; produced no data" in page
    assert "Nothing finite to plot." in page
    assert page.count("data:image/png;base64,") == len(FIGURE_IDS) - 4


def test_many_configurations_are_summarised(tmp_path, example):
    def mutate(r):
        for i in range(20):
            r["spectrum"][f"extra{i}"] = copy.deepcopy(r["spectrum"]["layer0"])
    page = render_report(_write(tmp_path, _mutated(example, mutate))).read_text()
    assert "more configurations are in the table below" in page and "extra19" in page


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


def test_summary_text_with_skipped_stages(example):
    def mutate(r):
        for key in ("spectrum", "krr", "correlation", "selection", "sweep_summary"):
            r[key] = {"skipped": "off"}
    text = summary_text(_mutated(example, mutate))
    assert "κ(all): Stage 'spectrum' was skipped: off" in text
    assert "sweep slopes: none" in text
