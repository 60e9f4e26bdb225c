"""The backend self-check: passes on a healthy backend, refuses (API and CLI) when a canary comes out wrong."""
import dataclasses

import numpy as np
import pytest

import jaxlin
from jaxlin import backend, cli


@pytest.fixture
def fresh_check():
    backend._check.cache_clear()
    yield
    backend._check.cache_clear()


def test_healthy_backend_passes_every_canary_in_float32_and_float64(fresh_check):
    check = jaxlin.check_backend()
    assert check.passed and check.status == "ok", check.message
    assert set(check.canaries) == {f"{n}/{d}" for n in backend.CANARIES for d in ("float32", "float64")}
    for name, c in check.canaries.items():
        assert c["passed"] and 0 <= c["relative_error"] <= c["tolerance"], name
        if name.endswith("float64"):
            assert c["relative_error"] < 1e-13, name
    assert jaxlin.check_backend() is check  # cached: a second call compiles and runs nothing
    record = check.to_dict()
    assert record["passed"] is True and record["jaxlib"] == check.jaxlib and record["canaries"] == check.canaries


def test_canaries_are_past_the_sizes_where_jaxlib_0_10_2_goes_wrong():
    x, c = backend.CANARIES["broadcast_reduce"].inputs(np.dtype("float32"))
    assert c.shape[0] == 2 and c[0].size > 16_384 and x.shape == c.shape[1:]
    x, _, ct = backend.CANARIES["vmapped_layer_norm_vjp"].inputs(np.dtype("float32"))
    assert ct.shape[0] == 2 and x.shape[0] >= 2_048 and x.shape[1] >= 16


def test_the_references_are_independent_of_jax(fresh_check):
    """Each reference is NumPy float64; the JAX computation in float64 agrees with it to rounding."""
    for name, canary in backend.CANARIES.items():
        inputs = canary.inputs(np.dtype("float64"))
        np.testing.assert_allclose(np.asarray(canary.compute(*inputs)), canary.reference(*inputs), rtol=1e-12,
                                   atol=1e-12, err_msg=name)


@pytest.fixture
def broken_canary(monkeypatch, fresh_check):
    """The broadcast-reduce canary computes what jaxlib 0.10.2 did: slice 0's reduction reused for slice 1."""
    def reused_first_slice(x_RW, c_SRW):
        return c_SRW + (x_RW * c_SRW[0]).sum(-1, keepdims=True)

    good = backend.CANARIES["broadcast_reduce"]
    monkeypatch.setitem(backend.CANARIES, "broadcast_reduce", dataclasses.replace(good, compute=reused_first_slice))


def test_a_wrong_canary_fails_the_check_with_both_fixes_named(broken_canary):
    check = jaxlin.check_backend(("float32",))
    assert not check.passed and check.status == "failed"
    assert not check.canaries["broadcast_reduce/float32"]["passed"]
    assert check.canaries["vmapped_layer_norm_vjp/float32"]["passed"]
    message = check.message
    assert f"jaxlib {check.jaxlib}" in message and "broadcast_reduce/float32 off by" in message
    assert "!=0.10.2" in message and "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce" in message
    with pytest.raises(jaxlin.BackendError, match="computes wrong numbers"):
        jaxlin.require_healthy_backend(("float32",))


def test_the_cli_refuses_to_run_on_a_wrong_backend_before_writing_anything(broken_canary, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--preset", "quick", "--stages", "ntk", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlin: error: the cpu backend of jaxlib ")
    assert "--xla_cpu_experimental_ynn_fusion_type=-reduce" in err[0]
    assert not out.exists()


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match=r"dtypes=\['bfloat16'\] cannot be checked; valid: \['float32', 'float64'\]"):
        jaxlin.check_backend(("float32", "bfloat16"))
