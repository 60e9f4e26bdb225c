"""`jaxlin run` as two real processes × two CPU devices on a (data=2, model=2) mesh: the same results.json
numbers as one process without a mesh, a stored stage reused by --resume, and the stages that are not yet
multi-process refused in one line (docs/scaling.md, "Running jaxlin run on a mesh and as several processes")."""
import json
import sys

import numpy as np
import pytest
from processes import clean_env, run_bounded

TIMEOUT_S = 600  # per command, under a loaded 2-core machine
# the quick preset, made smaller so three runs stay short: every stage still computes
SMALL = ["--preset", "quick", "--num-train", "32", "--num-calibration", "8", "--num-krr", "16", "--sign-kernel",
         "false"]


def _run(cmd, env, expect: int = 0) -> str:
    return run_bounded(cmd, env, TIMEOUT_S, expect)


def _two_processes(*args) -> list[str]:
    return ["bash", "scripts/launch_local.sh", "2", "--", sys.executable, "-m", "jaxlin.cli", "run", *SMALL,
            "--mesh", "data=2,model=2", *args]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results_and_resume(tmp_path):
    mesh_env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    mesh_dir, single_dir = tmp_path / "mesh", tmp_path / "single"
    # stages that cannot run as several processes yet are refused before any model is loaded
    out = _run(_two_processes("--stages", "ntk,sweep", "--out", str(mesh_dir)), mesh_env, expect=2)
    assert "the stages sweep are not yet multi-process; run them in one process" in out, out[-2000:]
    # the kernels first (as if a run had been killed after them), then every stage with --resume
    out = _run(_two_processes("--stages", "ntk", "--out", str(mesh_dir)), mesh_env)
    assert "process 1: done" in out and not list(mesh_dir.glob("**/*.tmp")), out[-2000:]
    kernels = json.loads((mesh_dir / "stages" / "ntk.json").read_text())
    out = _run(_two_processes("--stages", "ntk,spectrum,krr", "--out", str(mesh_dir), "--resume"), mesh_env)
    assert "[p0] [1/3] ntk: reused" in out and "[p1] [1/3] ntk: reused" in out, out[-2000:]
    assert not (mesh_dir / ".jaxlin.lock").exists()
    _run([sys.executable, "-m", "jaxlin.cli", "run", *SMALL, "--stages", "ntk,spectrum,krr", "--out",
          str(single_dir)], clean_env())

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
