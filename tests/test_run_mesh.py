"""`jaxlin run` as two real processes × two CPU devices on a (data=2, model=2) mesh: the same results.json
numbers as one process without a mesh (kernels, KRR, spectra, the λ sweep, the probe and the κ study), a stored
stage reused by --resume, and a batch that does not split over the processes refused in one line (docs/scaling.md,
"Running jaxlin run on a mesh and as several processes")."""
import json
import sys

import numpy as np
import pytest
from processes import clean_env, run_bounded

TIMEOUT_S = 600  # per command, under a loaded 2-core machine
# the quick preset, made smaller so three runs stay short: every stage still computes (the sweep: one λ, 3 steps;
# the study: its 6 runs, its selections chosen and compared but not trained, which would be 8 more fits a run)
SMALL = ["--preset", "quick", "--num-train", "16", "--num-eval", "16", "--num-calibration", "8", "--num-krr", "8",
         "--sign-kernel", "false", "--lambdas", "0.5", "--sweep-steps", "3", "--probe-directions", "1",
         "--probe-tangents", "1", "--study", "smoke", "--train-selections", "false"]
STAGES = "ntk,spectrum,krr,sweep,probe,study"


def _run(cmd, env, expect: int = 0) -> str:
    return run_bounded(cmd, env, TIMEOUT_S, expect)


def _two_processes(*args) -> list[str]:
    return ["bash", "scripts/launch_local.sh", "2", "--", sys.executable, "-m", "jaxlin.cli", "run", *SMALL,
            "--mesh", "data=2,model=2", *args]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results_and_resume(tmp_path):
    mesh_env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    mesh_dir, single_dir = tmp_path / "mesh", tmp_path / "single"
    # a batch that does not split over the processes is refused before any model is loaded
    out = _run(_two_processes("--stages", "sweep", "--batch-size", "3", "--out", str(mesh_dir)), mesh_env, expect=2)
    assert "--batch-size 3 does not split over the 2 processes and the data axis of size 2 of the sweep stage" in out, out[-2000:]
    # the kernels first (as if a run had been killed after them), then every stage with --resume
    out = _run(_two_processes("--stages", "ntk", "--out", str(mesh_dir)), mesh_env)
    assert "process 1: done" in out and not list(mesh_dir.glob("**/*.tmp")), out[-2000:]
    kernels = json.loads((mesh_dir / "stages" / "ntk.json").read_text())
    out = _run(_two_processes("--stages", STAGES, "--out", str(mesh_dir), "--resume"), mesh_env)
    assert "[p0] [1/6] ntk: reused" in out and "[p1] [1/6] ntk: reused" in out, out[-2000:]
    assert not (mesh_dir / ".jaxlin.lock").exists()
    _run([sys.executable, "-m", "jaxlin.cli", "run", *SMALL, "--stages", STAGES, "--out", str(single_dir)],
         clean_env())

    mesh, single = (json.loads((d / "results.json").read_text()) for d in (mesh_dir, single_dir))
    assert mesh["stages"]["ntk"]["reused"] and mesh["stages"]["ntk"]["finished"] == kernels["finished"]
    assert mesh["config"]["mesh"]["shape"] == "data=2,model=2" and single["config"]["mesh"]["shape"] is None
    assert mesh["inputs"] == single["inputs"]  # the mesh is not part of what a stage read
    with np.load(mesh_dir / "arrays.npz") as a, np.load(single_dir / "arrays.npz") as b:
        grams = [k for k in b.files if k.startswith(("gram/", "krr/"))]
        assert sorted(a.files) == sorted(b.files) and len(grams) > 3
        for name in grams:
            assert np.max(np.abs(a[name] - b[name])) <= 1e-5 * np.max(np.abs(b[name])), name
    assert mesh["krr"]["eval_accuracy"] == single["krr"]["eval_accuracy"]
    assert mesh["krr"]["train_accuracy"] == single["krr"]["train_accuracy"]
    assert mesh["krr"]["eval_accuracy_at_init"] == single["krr"]["eval_accuracy_at_init"]
    for method, want in single["selection"]["methods"].items():  # κ amplifies rounding: same picks, close scores
        got = mesh["selection"]["methods"][method]
        assert got["modules"] == want["modules"], method
        assert np.allclose(np.asarray(got["scores"], float), np.asarray(want["scores"], float), rtol=1e-4), method
    for name, entry in single["spectrum"].items():
        got, want = mesh["spectrum"][name]["stats"], entry["stats"]
        assert np.allclose(got["eigenvalues"], want["eigenvalues"], rtol=1e-4, atol=1e-9 * np.max(np.abs(want["eigenvalues"])))
    _check_sweep_and_probe(mesh, single)
    _check_study(mesh, single)


def _check_sweep_and_probe(mesh: dict, single: dict) -> None:
    """The sweep's losses and distances to 1e-4 relative and its accuracies equal; the probe's Jacobian estimates
    to 1e-4, its Taylor remainder (f(θ) − f_lin(θ) cancels to ~r² in float32) at the largest radius to 1e-2."""
    assert len(mesh["sweep"]) == len(single["sweep"]) == 1
    got, want = mesh["sweep"][0], single["sweep"][0]
    assert want["theta_distance_lin_nonlin"] > 0
    for key, value in want.items():
        if "accuracy" in key or "agreement" in key or key.startswith(("num_", "lambda")):
            assert got[key] == value, key
        elif key.startswith(("theta_", "output_", "kl_", "eval_loss", "train_loss", "loss_curve", "init_")):
            np.testing.assert_allclose(got[key], value, rtol=1e-4, err_msg=key)
    estimates, reference = mesh["probe"]["estimates"], single["probe"]["estimates"]
    assert mesh["probe"]["settings"] == single["probe"]["settings"]
    for key in ("L_max", "L_avg", "L_upper"):
        np.testing.assert_allclose(estimates["jacobian"][key], reference["jacobian"][key], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(estimates["remainder"][key][-1], reference["remainder"][key][-1], rtol=1e-2,
                                   err_msg=key)


def _check_study(mesh: dict, single: dict) -> None:
    """Every study run's outcomes and its KRR predictor equal, its losses and κ to float32 rounding (κ amplifies
    the kernels' 1e-5), and the selections pick the same modules."""
    runs, reference = mesh["correlation"]["runs"], single["correlation"]["runs"]
    assert [(r["configuration"], r["seed"]) for r in runs] == [(r["configuration"], r["seed"]) for r in reference]
    for got, want in zip(runs, reference):
        for key in ("eval_accuracy", "train_accuracy", "krr_eval_accuracy", "krr_agreement"):
            assert got[key] == want[key], key
        np.testing.assert_allclose(got["train_loss_curve"], want["train_loss_curve"], rtol=1e-4)
        np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-4)
        assert got["statistics"]["kappa"] == pytest.approx(want["statistics"]["kappa"], rel=1e-4)
    for name, method in single["correlation"]["selection"]["methods"].items():
        assert mesh["correlation"]["selection"]["methods"][name]["modules"] == method["modules"], name
