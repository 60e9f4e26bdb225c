"""Blocked, resumable, sharded assembly of Gram-like pytrees from a tile function.

`blocked_gram(tile_fn, x1, x2, block_size=...)` splits the examples (leading axis of every leaf) of x1 and
x2 into tiles of `block_size`, calls `tile_fn(x1_tile, x2_tile, *args)` (jitted once: the last tile is
padded with copies of row 0 and the padding dropped, so shapes never change) and writes each result leaf
(n1, n2, ...) into a host numpy array (N1, N2, ...) of `accumulate_dtype`. Generic: the eNTK of `ntk.py`
and per-module kernels use the same engine; `args` (e.g. params) are passed as jit arguments, never baked
in as constants.

Symmetry (x2 None): only tiles j ≥ i are computed; tile (i, j) is mirrored into (j, i) by swapping the two
example axes and each following pair of output axes: (n1, n2, O, O) → (n2, n1, O, O) with axes (1, 0, 3, 2).
So trailing axes must come in (x1, x2) pairs, as `empirical_ntk_fn` lays them out.

Resume: with `checkpoint_dir`, every finished tile is written atomically (temp file + os.replace) as
`tile_IIIII_JJJJJ.npz`, next to `manifest.json` (shapes, block sizes, symmetry, a SHA-256 fingerprint of
the inputs' bytes and the user's `key`). A rerun loads the tiles on disk and computes only the rest; a
manifest that does not match raises, naming the directory.

Row reuse: a tile function given as `RowFactored(rows, pair)` factors as pair(rows(x1_tile), rows(x2_tile)).
Then each row block's `rows` are computed once and kept on the device (up to `cache_bytes`; blocks beyond it
are recomputed when needed), so an (n × m)-tile Gram costs n + m row computations instead of 2·n·m. The
structured per-module kernels are of this kind: `rows` is the forward and backward passes of a block, `pair`
a contraction of their features.

Sharding: pass `mesh` (a jax.sharding.Mesh) and `sharding=ShardingSpec(data_axis="data")`; the rows of each
x1 tile are sharded over that mesh axis with NamedSharding, x2 tiles are replicated, and the tile is jitted
with those in/out shardings (the block is rounded up to a multiple of the axis size). `args` leaves already
laid out on the mesh (parameters placed by `jaxlin.sharding.shard_adapted`, split over `model` and `data`)
keep their sharding, and XLA gathers what each step needs; other leaves are replicated. The rows a
`RowFactored` tile keeps for reuse are the outputs of its jitted `rows`, so they stay sharded over the data
axis as their inputs are. One code path for 1 CPU, N simulated CPU devices and one or more GPUs.

Several processes (`jax.distributed`, see docs/scaling.md): every process calls `blocked_gram` with the same
x1, x2 and args on a mesh over all global devices; each process builds only its own devices' shards of a
tile (`jax.make_array_from_callback`), and tiles are gathered to every host with
`multihost_utils.process_allgather`, so every process returns the full host arrays. With a `checkpoint_dir`
every process must see the same directory (a shared file system): all of them read the tiles already there,
so they skip the same tiles and run the same computations, and process 0 alone writes.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxlin._types import PyTree
from jaxlin.distributed import to_host
from jaxlin.sharding import is_on_mesh, place
from jaxlin._util import leading_size

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """Maps the logical example axis of a tile's x1 rows to a mesh axis."""

    data_axis: str = "data"


@dataclasses.dataclass(frozen=True)
class RowFactored:
    """A tile function that factors through per-block work: tile(x1, x2, *args) = pair(rows(x1, *args),
    rows(x2, *args)), with x2=None meaning the same rows on both sides (computed once)."""

    rows: Callable
    pair: Callable

    def __call__(self, x1, x2, *args):
        r1 = self.rows(x1, *args)
        return self.pair(r1, r1 if x2 is None else self.rows(x2, *args))


def _rows(x, start: int, size: int, n: int):
    """Rows start..start+size of x, rows past n replaced by row 0 (fixed tile shape)."""
    idx = np.arange(start, start + size)
    idx = np.where(idx < n, idx, 0)
    return jax.tree.map(lambda a: a[idx], x)


def _mirror(tile: np.ndarray) -> np.ndarray:
    rest = tile.ndim - 2
    if rest % 2:
        raise ValueError(f"symmetric=True needs tile axes (n1, n2) + pairs of output axes; got tile shape "
                         f"{tile.shape}. Pass symmetric=False.")
    perm = [1, 0] + [2 + k + s for k in range(0, rest, 2) for s in (1, 0)]
    return tile.transpose(perm)


def _fingerprint(x1, x2, key: str) -> str:
    h = hashlib.sha256(key.encode())
    for leaf in jax.tree.leaves((x1, x2)):
        arr = np.ascontiguousarray(to_host(leaf))
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _atomic_write(path: str, write: Callable) -> None:
    """Write ``path`` whole or not at all; on several processes only process 0 writes (all of them read)."""
    if jax.process_index() != 0:
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _open_checkpoint(checkpoint_dir: str, manifest: dict) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} holds tiles of another computation "
                             f"(manifest differs in {diff}); use a fresh checkpoint_dir or delete this one.")
        return
    _atomic_write(path, lambda fh: fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))


def _tile_path(checkpoint_dir: str, i: int, j: int) -> str:
    return os.path.join(checkpoint_dir, f"tile_{i:05d}_{j:05d}.npz")


def blocked_gram(tile_fn: Callable, x1: PyTree, x2: Optional[PyTree] = None, *, block_size: Optional[int],
                 args: tuple = (), symmetric: Optional[bool] = None, accumulate_dtype=np.float64,
                 progress: bool = True, checkpoint_dir: Optional[str] = None, key: str = "",
                 mesh: Optional[jax.sharding.Mesh] = None, sharding: ShardingSpec = ShardingSpec(),
                 diagonal_as_none: bool = False, cache_bytes: int | None = None,
                 _after_tile: Optional[Callable[[int, int], None]] = None) -> PyTree:
    """Assemble the pytree of (N1, N2, ...) host arrays of `tile_fn` over all tiles (module docstring).

    Args:
      tile_fn: `tile_fn(x1_tile, x2_tile, *args)` -> pytree of arrays with leading shape (n1, n2); must
        treat rows independently (padding rows are copies of row 0 and are dropped).
      x1, x2: pytrees of arrays with a leading example axis; x2=None means x2 = x1.
      block_size: examples per tile (> 0), or None for one tile holding every row.
      args: extra operands passed through to tile_fn (jit arguments, replicated over the mesh).
      symmetric: use K(x1, x1) = mirror(K) and compute only tiles j ≥ i; default: x2 is None.
      accumulate_dtype: dtype of the host arrays (tiles are cast on the host).
      progress: show a tqdm bar.
      checkpoint_dir, key: resume directory and a string identifying the computation (e.g. model + params
        revision: params are not fingerprinted, only x1, x2 and key).
      mesh, sharding: shard the rows of each x1 tile over `mesh.shape[sharding.data_axis]` devices.
      diagonal_as_none: in symmetric mode, call diagonal tiles as tile_fn(x_tile, None, *args), so a tile
        function that accepts x2=None (rows of both sides the same) can reuse its per-row work.
      cache_bytes: for a `RowFactored` tile_fn, the most bytes of computed rows kept for reuse; None: a quarter
        of the first device's memory where it reports one (GPUs, TPUs), else 2 GiB; 0 recomputes every
        block's rows for each tile (the row block of the current tile row is always kept).
      _after_tile: test hook called as _after_tile(i, j) after each computed (not loaded) tile is stored.
    """
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size <= 0):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}.")
    if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, np.integer))
                                    or cache_bytes < 0):
        raise ValueError(f"cache_bytes must be None (automatic) or an int ≥ 0, got {cache_bytes!r}.")
    if symmetric is None:
        symmetric = x2 is None
    if symmetric and x2 is not None:
        raise ValueError("symmetric=True is only valid with x2=None (the Gram of x1 with itself).")
    n1 = leading_size(x1, "x1")
    x2_full = x1 if x2 is None else x2
    n2 = leading_size(x2_full, "x2")
    if mesh is not None and sharding.data_axis not in mesh.shape:
        raise ValueError(f"sharding.data_axis={sharding.data_axis!r} is not an axis of the mesh; valid: "
                         f"{tuple(mesh.shape)}.")
    shards = 1 if mesh is None else mesh.shape[sharding.data_axis]
    b1, b2 = (n1, n2) if block_size is None else (min(block_size, n1), min(block_size, n2))
    b1 = -(-b1 // shards) * shards
    if symmetric:
        b2 = b1
    tiles = [(i, j) for i in range(-(-n1 // b1)) for j in range(-(-n2 // b2)) if not symmetric or j >= i]

    tiling = (tile_fn, x1, x2_full, b1, b2, n1, n2, symmetric, args, mesh, sharding)
    if isinstance(tile_fn, RowFactored):
        compute_tile = _row_reuse(*tiling, cache_bytes)
    else:
        compute_tile = _whole_tiles(*tiling, diagonal_as_none)
    shapes = jax.eval_shape(tile_fn, _rows(x1, 0, b1, n1), _rows(x2_full, 0, b2, n2), *args)
    leaves_shape, treedef = jax.tree.flatten(shapes)
    for s in leaves_shape:
        if s.shape[:2] != (b1, b2):
            raise ValueError(f"tile_fn must return arrays with leading shape (n1, n2)=({b1}, {b2}); got {s.shape}.")
    out = [np.zeros((n1, n2) + s.shape[2:], accumulate_dtype) for s in leaves_shape]

    if checkpoint_dir is not None:
        _open_checkpoint(checkpoint_dir, {
            "n1": n1, "n2": n2, "block": [b1, b2], "symmetric": symmetric, "key": key,
            "fingerprint": _fingerprint(x1, x2, key), "accumulate_dtype": np.dtype(accumulate_dtype).name,
            "leaves": [[list(s.shape[2:]), np.dtype(s.dtype).name] for s in leaves_shape]})

    def store(i, j, leaves):
        r1, r2 = slice(i * b1, min((i + 1) * b1, n1)), slice(j * b2, min((j + 1) * b2, n2))
        for acc, tile in zip(out, leaves):
            tile = tile[: r1.stop - r1.start, : r2.stop - r2.start]
            acc[r1, r2] = tile
            if symmetric and i != j:
                acc[r2, r1] = _mirror(tile)

    bar = tqdm(total=len(tiles), disable=not progress, desc="gram tiles")
    pending = collections.deque()

    def finish_one():
        i, j, result = pending.popleft()
        leaves = [to_host(a) for a in jax.tree.leaves(result)]
        if checkpoint_dir is not None:
            valid = [a[: min(b1, n1 - i * b1), : min(b2, n2 - j * b2)] for a in leaves]
            _atomic_write(_tile_path(checkpoint_dir, i, j), lambda fh: np.savez(fh, *valid))
        store(i, j, leaves)
        bar.update()
        if _after_tile is not None:
            _after_tile(i, j)

    for i, j in tiles:
        path = None if checkpoint_dir is None else _tile_path(checkpoint_dir, i, j)
        if path is not None and os.path.exists(path):
            with np.load(path) as z:
                store(i, j, [z[f"arr_{k}"] for k in range(len(out))])
            bar.update()
            continue
        pending.append((i, j, compute_tile(i, j)))  # dispatch the next tile before fetching this one
        if len(pending) > 1:
            finish_one()
    while pending:
        finish_one()
    bar.close()
    return jax.tree.unflatten(treedef, out)


def _default_cache_bytes() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}  # devices()[0] may belong to another process
    return int(stats["bytes_limit"]) // 4 if stats.get("bytes_limit") else 2 << 30


def _put(tree, sharding):
    """Every leaf of ``tree`` on ``sharding`` (on several processes, each builds only its own shards)."""
    return place(tree, jax.tree.map(lambda _: sharding, tree))


def _args_on_mesh(args, mesh):
    """Leaves already laid out on ``mesh`` (sharded parameters) as they are; every other leaf replicated."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: a if is_on_mesh(a, mesh) else _put(a, rep), args)


def _whole_tiles(tile_fn, x1, x2, b1, b2, n1, n2, symmetric, args, mesh, sharding, diagonal_as_none):
    """compute_tile(i, j) dispatching tile_fn on the two row blocks (x2 None on a diagonal tile if asked)."""
    if mesh is None:
        jitted = jax.jit(tile_fn)
        place_tiles = lambda t1, t2: (t1, t2, args)  # noqa: E731
    else:
        rows, rep = NamedSharding(mesh, P(sharding.data_axis)), NamedSharding(mesh, P())
        jitted = jax.jit(tile_fn, out_shardings=rows)
        args_placed = _args_on_mesh(args, mesh)
        place_tiles = lambda t1, t2: (_put(t1, rows), _put(t2, rep), args_placed)  # noqa: E731

    def compute_tile(i, j):
        t1, t2, a = place_tiles(_rows(x1, i * b1, b1, n1), _rows(x2, j * b2, b2, n2))
        if symmetric and diagonal_as_none and i == j:
            t2 = None
        return jitted(t1, t2, *a)

    return compute_tile


def _row_reuse(tile_fn: RowFactored, x1, x2, b1, b2, n1, n2, symmetric, args, mesh, sharding, cache_bytes):
    """compute_tile(i, j) for a RowFactored tile: rows of each block computed once and kept within cache_bytes
    (a diagonal tile always reuses its block's rows)."""
    rows_fn = jax.jit(tile_fn.rows)
    if mesh is None:
        pair_fn = jax.jit(tile_fn.pair)
        put_side = {"x1": lambda t: t, "x2": lambda t: t}
        args_placed = args
    else:  # x1 blocks sharded over the data axis, x2 blocks replicated; jit inserts what pair needs to gather
        row_sharding, rep = NamedSharding(mesh, P(sharding.data_axis)), NamedSharding(mesh, P())
        pair_fn = jax.jit(tile_fn.pair, out_shardings=row_sharding)
        args_placed = _args_on_mesh(args, mesh)
        put_side = {"x1": lambda t: _put(t, row_sharding), "x2": lambda t: _put(t, row_sharding if symmetric else rep)}
    cache_bytes = _default_cache_bytes() if cache_bytes is None else cache_bytes
    sides = {"x1": (x1, b1, n1), "x2": (x1, b1, n1) if symmetric else (x2, b2, n2)}
    sizes = {side: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(
        jax.eval_shape(tile_fn.rows, _rows(x, 0, b, n), *args))) for side, (x, b, n) in sides.items()}
    cache, used, current = {}, [0], {}

    def block_rows(side, index):
        key = ("x1" if symmetric else side, index)
        if key in cache:
            return cache[key]
        if side == "x1" and current.get("index") == index:
            return current["rows"]
        x, b, n = sides[side]
        r = rows_fn(put_side[side](_rows(x, index * b, b, n)), *args_placed)
        if used[0] + sizes[side] <= cache_bytes:
            cache[key] = r
            used[0] += sizes[side]
        return r

    def compute_tile(i, j):
        r1 = block_rows("x1", i)
        current.update(index=i, rows=r1)
        r2 = r1 if symmetric and i == j else block_rows("x2", j)
        return pair_fn(r1, r2)

    return compute_tile
