"""`jaxlin run --resume` continues a sweep killed mid-stage from its fits' training checkpoints (docs/scaling.md,
"Resuming training"), and the run directory keeps only the training state a run may continue."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from jaxlin import pipeline, rundir
from jaxlin.config import ConfigError, override, preset
from processes import ROOT, clean_env, run_bounded
from test_refusals_cli import write_csv


# ------------------------------------------------------------------------------------------------ the config key

@pytest.mark.parametrize("value,want", [("7", 7), ("0", 0), ("none", None), (None, None)])
def test_checkpoint_every_is_read_and_kept_out_of_the_fingerprint(value, want):
    c = override(preset("quick"), {"checkpoint_every": value})
    assert c.execution.checkpoint_every == want and c.get("execution.checkpoint_every") == want
    assert c.fingerprint() == preset("quick").fingerprint()  # a run resumed with another K still resumes


@pytest.mark.parametrize("bad", [-1, 2.5, True, "often"])
def test_a_bad_checkpoint_every_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match=r"^checkpoint_every=.*(is invalid: optimiser steps|must be an integer)") \
            as error:
        override(preset("quick"), {"execution": {"checkpoint_every": bad}})
    assert "\n" not in str(error.value) and repr(bad) in str(error.value)


# ------------------------------------------------------------------------------------- what a run keeps of it

def _leftover(out: Path, stage: str, *keys: str) -> None:
    for key in keys:
        (rundir.train_state_dir(out, stage, key) / "0-nonlinear" / "4").mkdir(parents=True)


def _prepare(out: Path, resume: bool, capsys) -> str:
    ctx = types.SimpleNamespace(out=out, config=preset("quick"))
    pipeline._prepare_train_state(ctx, "sweep", "current", resume)
    return capsys.readouterr().err


def test_resume_keeps_the_training_state_of_this_stage_key_only(tmp_path, capsys):
    _leftover(tmp_path, "sweep", pipeline._train_state_name("current"), pipeline._train_state_name("other"),
              "current-2proc")
    _leftover(tmp_path, "study", "other")
    err = _prepare(tmp_path, True, capsys)
    assert [p.name for p in (tmp_path / "train_state" / "sweep").iterdir()] == ["current-1proc"]
    assert "removed the training state an earlier run left" in err and "of other inputs or another number" in err
    assert "sweep: resuming from the training state in" in err
    assert (tmp_path / "train_state" / "study" / "other").is_dir()  # another stage's is its own


def test_a_run_without_resume_starts_the_stage_afresh(tmp_path, capsys):
    _leftover(tmp_path, "sweep", pipeline._train_state_name("current"))
    err = _prepare(tmp_path, False, capsys)
    assert not (tmp_path / "train_state").exists() and "pass --resume to continue it instead" in err
    assert _prepare(tmp_path, False, capsys) == ""  # nothing left, nothing said


# ------------------------------------------------------------------------------- a study interrupted and resumed

class Interrupted(Exception):
    pass


@pytest.mark.slow  # trains gated LoRA runs of a tiny BERT three times
def test_an_interrupted_study_reads_back_its_finished_runs(tmp_path):
    """run_study stopped after its second trained run, then called again on the same checkpoint_dir, gives the
    result of an uninterrupted study; the runs that finished are read back from their checkpoints, not retrained."""
    import jax.numpy as jnp

    from jaxlin.study import run_study
    from jaxlin.testing import tiny_model
    from test_study import WordTokenizer, _config, _dataset

    model = tiny_model("bert", task="classification", num_labels=2, dtype=jnp.float64)
    splits = _dataset(40, 0), _dataset(16, 1)
    config = _config(configurations={"a": ("layer0.attention.query",), "b": ("layer1.attention.key",)},
                     seeds=(4,), kernels=("ntk",), num_calibration_large=None)
    kw = dict(tokenizer=WordTokenizer(), progress=False)
    want = run_study(model, *splits, config, **kw)
    records = []

    def stop_after_two(record):
        records.append(record)
        if len(records) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_study(model, *splits, config, **kw, callback=stop_after_two, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert len(list(tmp_path.iterdir())) == 2  # one directory per trained run
    got = run_study(model, *splits, config, **kw, checkpoint_dir=tmp_path, checkpoint_every=1)

    def outcomes(result):
        return [{k: v for k, v in r.items() if k != "wall_time_s"}
                for r in [*result["runs"], *result["selection"]["methods"].values()]]

    assert outcomes(got) == outcomes(want)


# -------------------------------------------------------------------------------- a sweep killed and resumed

SWEEP_TIMEOUT_S = 300


def _sweep_argv(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "jaxlin.cli", "run", "--stages", "sweep", "--preset", "quick", "--dataset", str(data),
            "--num-train", "24", "--num-krr", "4", "--num-calibration", "4", "--targets", "query", "--layers", "0",
            "--out", str(out), *extra]


def _sweep(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    for entry in results["sweep"]:
        del entry["wall_time_s"]  # seconds, not a result
    return {"sweep": results["sweep"], "sweep_summary": results["sweep_summary"]}


def _later_checkpoint(out: Path) -> bool:
    """A finished Orbax checkpoint of the second λ's first fit (Orbax renames a step's directory into place once
    it is whole)."""
    return any(p.name.isdigit() for p in out.glob("train_state/sweep/*/1-nonlinear/*"))


@pytest.mark.slow
def test_a_sweep_killed_mid_stage_resumes_on_the_uninterrupted_trajectory(tmp_path):
    """A (uninterrupted) and B (SIGKILLed once its second λ has checkpointed, then run with --resume) end with
    the same sweep, bit for bit: a resumed fit restores the exact bits of its parameters and optimiser state and
    runs the same compiled step on the same batches (tests/test_train_resume.py), so no tolerance is needed."""
    data = write_csv(tmp_path / "d.csv", 40)
    env = clean_env()
    run_bounded(_sweep_argv(data, tmp_path / "a"), env, SWEEP_TIMEOUT_S)
    b_out, b_log = tmp_path / "b", tmp_path / "b.log"
    argv = _sweep_argv(data, b_out, "--checkpoint-every", "2")
    with open(b_log, "wb") as log:
        b = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + SWEEP_TIMEOUT_S
        while not _later_checkpoint(b_out):
            assert b.poll() is None, b_log.read_text()[-3000:]
            assert time.monotonic() < end, f"no checkpoint of the second λ within {SWEEP_TIMEOUT_S} s"
            time.sleep(0.05)
    finally:
        os.killpg(b.pid, signal.SIGKILL)
        b.wait()
    assert not (b_out / "results.json").exists()  # killed mid-stage
    out = run_bounded([*argv, "--resume"], env, SWEEP_TIMEOUT_S)
    assert "sweep: resuming from the training state in" in out
    assert "sweep: λ=0.5 nonlinear: finished before the interruption, read back from its checkpoint" in out
    assert re.search(r"sweep: λ=50 nonlinear: (resumed at step \d+ of 12|finished before the interruption)", out)
    assert _sweep(b_out) == _sweep(tmp_path / "a")
    assert not (b_out / "train_state").exists()  # stored: the stage is what --resume reads now
