"""blocked_gram: tiling, symmetry mirror, generic pytree tiles, one compile, sharding, kill-and-resume."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlin.gram import RowFactored, ShardingSpec, blocked_gram
from jaxlin.ntk import empirical_ntk_fn

N1, N2, D, H, O = 7, 5, 5, 11, 3


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"w1": jax.random.normal(k[0], (D, H)) / 2.2, "b1": 0.1 * jax.random.normal(k[1], (H,)),
            "w2": jax.random.normal(k[2], (H, O)) / 3.3, "b2": 0.1 * jax.random.normal(k[3], (O,))}


PARAMS = _params()
X1 = jax.random.normal(jax.random.PRNGKey(1), (N1, D))
X2 = jax.random.normal(jax.random.PRNGKey(2), (N2, D))
NTK_FULL = empirical_ntk_fn(mlp, trace_axes=(), implementation="jacobian_contraction")


def _pair_tile(a, b, params):
    """A pytree tile: the full (n1, n2, O, O) kernel and its (n1, n2) trace."""
    k = NTK_FULL(a, b, params)
    return {"full": k, "trace": jnp.einsum("abii->ab", k)}


def _reference(x2):
    return jax.tree.map(np.asarray, _pair_tile(X1, X1 if x2 is None else x2, PARAMS))


@pytest.mark.parametrize("x2", [None, X2], ids=["symmetric", "cross"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 10, None])
def test_blocked_equals_unblocked(x2, block_size):
    ref = _reference(x2)
    out = blocked_gram(_pair_tile, X1, x2, args=(PARAMS,), block_size=block_size, progress=False)
    assert out["full"].dtype == np.float64 and out["full"].shape == ref["full"].shape
    for name in ("full", "trace"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-13, atol=1e-13)


def test_symmetric_mirror_swaps_output_axes():
    # T[a, b, i, j] = (x_a U)_i (x_b U)_j: T[b, a, j, i] = T[a, b, i, j] holds, T[b, a, i, j] does not
    def tile(a, b, u):
        return jnp.einsum("ai,bj->abij", a @ u, b @ u)

    u = jax.random.normal(jax.random.PRNGKey(3), (D, O))
    out = blocked_gram(tile, X1, None, args=(u,), block_size=2, progress=False, accumulate_dtype=np.float32)
    ref = np.asarray(tile(X1, X1, u))
    assert out.dtype == np.float32 and not np.allclose(ref, ref.transpose(1, 0, 2, 3))
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_one_compile_and_no_retrace_on_second_call():
    traces = []

    def tile(a, b, params):
        traces.append(a.shape)
        return NTK_FULL(a, b, params)

    seen = []
    blocked_gram(tile, X1, None, args=(PARAMS,), block_size=3, progress=True,
                 _after_tile=lambda i, j: seen.append((i, j)))
    assert sorted(seen) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]  # j ≥ i only
    n = len(traces)
    blocked_gram(tile, X1, X2, args=(_params(1),), block_size=3, symmetric=False, progress=False)
    assert n <= 2 and len(traces) == n  # eval_shape + one jit trace, nothing new on the second call


def test_bad_inputs_raise_value_errors():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block_size"):
            blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=bad)
    with pytest.raises(ValueError, match="cache_bytes"):
        blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, cache_bytes=-1)
    with pytest.raises(ValueError, match="leading"):
        blocked_gram(_pair_tile, {"a": X1, "b": X2}, args=(PARAMS,), block_size=2)
    with pytest.raises(ValueError, match="symmetric"):
        blocked_gram(_pair_tile, X1, X2, args=(PARAMS,), block_size=2, symmetric=True)
    with pytest.raises(ValueError, match="symmetric=False"):
        blocked_gram(lambda a, b: jnp.zeros((a.shape[0], b.shape[0], 3)), X1, block_size=2, progress=False)
    with pytest.raises(ValueError, match="'rows'"):
        blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, mesh=Mesh(np.array(jax.devices()[:2]), ("data",)),
                     sharding=ShardingSpec("rows"))


@pytest.mark.parametrize("devices", [4, 8])
@pytest.mark.parametrize("block_size", [3, None])
def test_sharded_equals_single_device(devices, block_size):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    for x2 in (None, X2):
        ref = _reference(x2)
        out = blocked_gram(_pair_tile, X1, x2, args=(PARAMS,), block_size=block_size, mesh=mesh, progress=False)
        for name in ("full", "trace"):
            np.testing.assert_allclose(out[name], ref[name], rtol=1e-13, atol=1e-13)


def _factored(counter):
    """_pair_tile as rows (the per-example Jacobian, a pytree) and pair (their contraction); counts rows runs."""
    def rows(x, params):
        jax.debug.callback(lambda: counter.append(1))
        return jax.vmap(lambda xi: jax.jacrev(mlp)(params, xi))(x)

    def pair(j1, j2):
        k = sum(jnp.einsum("aip,bjp->abij", a.reshape(a.shape[:2] + (-1,)), b.reshape(b.shape[:2] + (-1,)))
                for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
        return {"full": k, "trace": jnp.einsum("abii->ab", k)}

    return RowFactored(rows, pair)


@pytest.mark.parametrize("x2, cache_bytes, row_runs", [(None, 2 << 30, 3), (None, 0, 6), (X2, 2 << 30, 5), (X2, 0, 9)],
                         ids=["symmetric", "symmetric-no-cache", "cross", "cross-no-cache"])
def test_row_factored_reuses_rows_and_equals_the_tile(x2, cache_bytes, row_runs):
    ref, runs = _reference(x2), []
    out = blocked_gram(_factored(runs), X1, x2, args=(PARAMS,), block_size=3, cache_bytes=cache_bytes,
                       progress=False)
    jax.effects_barrier()
    assert len(runs) == row_runs  # 3 row blocks of X1 (and 2 of X2); without a cache each tile recomputes x2's
    for name in ("full", "trace"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-13, atol=1e-13)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = blocked_gram(_factored([]), X1, x2, args=(PARAMS,), block_size=3, mesh=mesh, progress=False)
    for name in ("full", "trace"):
        np.testing.assert_allclose(sharded[name], ref[name], rtol=1e-13, atol=1e-13)


def test_manifest_mismatch_names_the_directory(tmp_path):
    blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=4, checkpoint_dir=str(tmp_path), key="a", progress=False)
    with pytest.raises(ValueError, match=f"{tmp_path}.*fresh checkpoint_dir"):
        blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=4, checkpoint_dir=str(tmp_path), key="b")
    with pytest.raises(ValueError, match="fresh checkpoint_dir"):
        blocked_gram(_pair_tile, X1 + 1.0, args=(PARAMS,), block_size=4, checkpoint_dir=str(tmp_path), key="a")


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, {tests!r})
    from test_gram import PARAMS, X1, _pair_tile
    from jaxlin.gram import blocked_gram
    done = []
    def after_tile(i, j):
        done.append((i, j))
        if len(done) == int(os.environ["KILL_AFTER_TILES"]):
            os.kill(os.getpid(), signal.SIGKILL)
    blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, checkpoint_dir=sys.argv[1], key="mlp",
                 progress=False, _after_tile=after_tile)
""")


@pytest.mark.slow  # end to end: kills a tiling subprocess and resumes it from its checkpoints
def test_kill_and_resume_is_bit_identical(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, KILL_AFTER_TILES="4", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, str(script), str(ckpt)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list(ckpt.glob("tile_*.npz"))) == 4 and not list(ckpt.glob("*.tmp"))

    computed = []
    resumed = blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, checkpoint_dir=str(ckpt), key="mlp",
                           progress=False, _after_tile=lambda i, j: computed.append((i, j)))
    assert len(computed) == 10 - 4  # 4 row tiles: 10 tiles with j ≥ i, only the missing ones computed
    whole = blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, progress=False)
    for name in ("full", "trace"):
        np.testing.assert_array_equal(resumed[name], whole[name])
    again = []
    blocked_gram(_pair_tile, X1, args=(PARAMS,), block_size=2, checkpoint_dir=str(ckpt), key="mlp",
                 progress=False, _after_tile=lambda i, j: again.append((i, j)))
    assert again == []


def test_sharded_args_keep_their_sharding_and_cached_rows_stay_sharded():
    """Parameters already on the mesh (split over `model`) reach the tile as they are, not replicated; the rows a
    RowFactored tile keeps come out of its jitted `rows` split over `data` like their inputs."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w1": jax.random.normal(k[0], (D, 12)) / 2.2, "b1": 0.1 * jax.random.normal(k[1], (12,)),
              "w2": jax.random.normal(k[2], (12, O)) / 3.3, "b2": 0.1 * jax.random.normal(k[3], (O,))}
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
    placed = {n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in params.items()}
    seen = {"w1": [], "rows": []}

    def rows(x, p):
        jax.debug.inspect_array_sharding(p["w1"], callback=seen["w1"].append)
        return jax.vmap(lambda xi: jax.jacrev(mlp)(p, xi))(x)

    def pair(j1, j2):
        jax.debug.inspect_array_sharding(j1["w2"], callback=seen["rows"].append)
        k = sum(jnp.einsum("aip,bjp->abij", a.reshape(a.shape[:2] + (-1,)), b.reshape(b.shape[:2] + (-1,)))
                for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
        return {"full": k, "trace": jnp.einsum("abii->ab", k)}

    ref = blocked_gram(_pair_tile, X1, X2, args=(params,), block_size=None, progress=False)
    out = blocked_gram(RowFactored(rows, pair), X1, X2, args=(placed,), block_size=4, mesh=mesh, progress=False)
    for name in ("full", "trace"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-12, atol=1e-13)
    assert seen["w1"] and all(s.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2) for s in seen["w1"])
    assert seen["rows"] and all(not s.is_fully_replicated for s in seen["rows"])
