"""Several processes for real: two local processes × two CPU devices each (gloo collectives) compute the
per-module kernels of a tiny model sharded by the rules on a (data=2, model=2) mesh, and they equal a
single-process run. Also the one-line errors of jaxlin.distributed."""
import os
import sys

import numpy as np
import pytest
from processes import clean_env, run_bounded

from jaxlin import distributed

TIMEOUT_S = 420  # under a loaded 2-core machine; both runs together take far less on a quiet one


def test_parse_mesh_shapes_and_errors():
    assert dict(distributed.parse_mesh("data=4,model=2").shape) == {"data": 4, "model": 2}
    assert dict(distributed.parse_mesh("model=8").shape) == {"data": 1, "model": 8}
    with pytest.raises(ValueError, match=r"3×2 = 6 devices, but there are 8"):
        distributed.parse_mesh("data=3,model=2")
    with pytest.raises(ValueError, match="'pipe' .* unknown"):
        distributed.parse_mesh("data=4,pipe=2")
    with pytest.raises(ValueError, match="not AXIS=SIZE"):
        distributed.parse_mesh("data=two")
    with pytest.raises(ValueError, match="twice"):
        distributed.parse_mesh("data=2,data=4")


@pytest.mark.parametrize("stage,overrides,flag", [
    ("sweep", {"batch_size": 4}, "--batch-size 4"), ("dynamics", {"num_calibration": 8}, "--num-calibration 8"),
    ("study", {"study": "smoke"}, "--study smoke's batch size 4"),
    ("study", {"study": "quick"}, "--study quick's batch size 8")])
def test_rows_that_do_not_split_over_the_processes_are_refused_first(monkeypatch, stage, overrides, flag):
    """Each process feeds its share of every batch's rows: a run of P processes refuses, before loading anything,
    a stage whose batches do not split P ways, naming the flag and the multiple (here P = 3, a fake count)."""
    import jax

    from jaxlin import pipeline
    from jaxlin.config import ConfigError, override, preset

    config = override(preset("quick"), {**overrides, "stages": stage})
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ConfigError, match=f"^{flag} does not split over the 3 processes of the {stage} stage; "
                                          "choose a multiple of 3"):
        pipeline._check_mesh_stages(config, None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    pipeline._check_mesh_stages(config, None)  # every one of them splits two ways


def test_rows_that_do_not_split_over_the_data_axis_are_refused_first():
    """One process, a (data=4, model=2) mesh: every step's rows split over the data axis, so a batch of 6 is refused
    before loading anything (it used to stop inside the sweep, after the kernels were computed)."""
    from jaxlin import pipeline
    from jaxlin.config import ConfigError, override, preset

    mesh = distributed.parse_mesh("data=4,model=2")
    config = override(preset("quick"), {"batch_size": 6, "stages": "sweep"})
    with pytest.raises(ConfigError, match="^--batch-size 6 does not split over the data axis of size 4 of the sweep "
                                          "stage; choose a multiple of 4$"):
        pipeline._check_mesh_stages(config, mesh)
    pipeline._check_mesh_stages(override(config, {"batch_size": 8}), mesh)
    pipeline._check_mesh_stages(config, distributed.parse_mesh("data=2,model=4"))


def test_initialize_is_a_no_op_alone_and_names_what_is_missing(monkeypatch):
    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"\['coordinator', 'process_id'\] missing"):
        distributed.initialize()
    with pytest.raises(ValueError, match="not HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in 0\.\.1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


def _run(cmd, env, expect: int = 0) -> str:
    return run_bounded(cmd, env, TIMEOUT_S, expect)


@pytest.mark.slow
def test_two_processes_give_the_single_process_kernels(tmp_path):
    env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    script = [sys.executable, "scripts/mesh_kernels.py"]
    out = _run(["bash", "scripts/launch_local.sh", "2", "--", *script, "--mesh", "data=2,model=2",
                "--out", str(tmp_path / "mesh.npz")], env)
    assert "[p0] wrote" in out and "2 process(es), 4 device(s)" in out, out[-2000:]
    _run([*script, "--out", str(tmp_path / "single.npz")], dict(env, XLA_FLAGS=""))
    with np.load(tmp_path / "mesh.npz") as mesh, np.load(tmp_path / "single.npz") as single:
        assert sorted(mesh.files) == sorted(single.files) and len(single.files) > 3
        for name in single.files:
            ref = single[name]
            assert np.max(np.abs(mesh[name] - ref)) <= 1e-5 * np.max(np.abs(ref)), name


def test_launcher_stops_every_process_when_one_fails():
    env = dict(os.environ, PYTHON=sys.executable)
    out = _run(["bash", "scripts/launch_local.sh", "3", "--", sys.executable, "-c",
                "import os, sys, time; i = int(os.environ['JAXLIN_PROCESS_ID']); print('up', flush=True); "
                "time.sleep(3 if i == 1 else 600); sys.exit(3 if i == 1 else 0)"], env, expect=3)
    assert {"[p0] up", "[p1] up", "[p2] up"} <= set(out.splitlines()), out
    assert "process 1 exited with status 3; stopping the other 2" in out
