"""Per-module empirical NTKs of an adapted model: one pass, one kernel per trainable module.

    K_m(x, x')[a, b] = Σ_{θ ∈ module m} ∂f_a(x)/∂θ · ∂f_b(x')/∂θ,        K_S = Σ_{m ∈ S} K_m  (exactly)

so the kernel, spectrum and score of any configuration S of adapted modules come from these blocks with
no further Jacobian (docs/paper.md §5.4, §6.1). ``kernel="sign"`` gives K_m(x, x') = J_m(x) · s(J_m(x'))ᵀ with
s(z) = z/(|z|+1e-8), the asymmetric kernel the paper's published code computes (docs/paper.md §5.2).

Implementations (all exact, same numbers up to float rounding):

- ``"structured"``: from module inputs and output cotangents, no autodiff per parameter. One forward pass
  records every adapted dense module's input h_t (B, L, d_in); O backward passes (one per output, shared by
  the whole batch since examples are independent) give the cotangent g_t = ∂f_a/∂z_t at its output, through a
  zero probe added to z. Then, with s = alpha/rank, per example and output,
  ∂f/∂B = s (H A)ᵀ G (R, d_out), ∂f/∂A = s Hᵀ (G Bᵀ) (d_in, R), ∂f/∂bias = Σ_t g_t and, for a dense weight
  trained in full, K_W(x, x') = Σ_{t,t'} (h_t·h'_{t'}) (g_t·g'_{t'}) — the (L × L) form, never the
  d_in × d_out Jacobian. Groups that are not dense modules (LayerNorms, embeddings) fall back to
  per-example Jacobians of their few parameters.
- ``"jacobian_contraction"``: per-example reverse-mode Jacobians (``jaxlin.ntk.jacrev_per_output``) w.r.t. the
  trainable tree, contracted per leaf.
- ``"ntk_vector_products"``: K_m columns as jvp(vjp(e_b)) with the tangent restricted to module m.
- ``"auto"``: "structured" unless the request is a sign kernel of a full dense weight in L×L form.

A bfloat16 model (mixed precision, docs/scaling.md) runs its forward and backward passes in bfloat16; every
contraction that forms a kernel takes float32 operands (the structured path casts h and g; the Jacobians of
float32 trainable leaves are float32), and tiles sum in ``accumulate_dtype``.

Rows are tiled by ``jaxlin.gram.blocked_gram`` (``block_size``, symmetric reuse, float64 accumulation,
resumable tile checkpoints, sharding of rows over a mesh). An adapted model placed on the same mesh
(``jaxlin.sharding.shard_adapted``) keeps its parameters split over ``model``/``data``, on one process or
several; docs/scaling.md.
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import gram as _gram
from . import ntk as _ntk
from ._util import per_example
from .adapters import PREFIX_KEY, Adapted, AdaptedFunction, model_kwargs, prefix_kwargs
from .models.base import check_inputs
from .models.layers import at_least_float32, master_dtype

SIGN_EPS = _ntk.SIGN_EPS
IMPLEMENTATIONS = ("auto", "structured", "jacobian_contraction", "ntk_vector_products")


def _sign(x):
    return x / (jnp.abs(x) + SIGN_EPS)


def _check_output(out_shape, output_fn):
    if len(out_shape) != 2:
        raise ValueError(f"per-module kernels need outputs (B, O); the model returns {tuple(out_shape)}. Pass "
                         "output_fn mapping them to (B, O) (for label-word logits at the last real token: "
                         "jaxlin.label_word_readout(...).output_fn), or load the model with task='classification'")


def _group_leaves(adapted: Adapted, modules: Sequence[str]):
    """Split each group into LoRA factors, dense-module leaves and other leaves."""
    plan = {}
    for name in modules:
        paths = adapted.groups[name]
        lora = any(p[0] == "lora" for p in paths)
        dense = None
        if any(m.name == name for m in adapted.model.modules):
            dense = adapted.model.module(name)
        own = [p for p in paths if p[0] == "params" and dense is not None and p[1:-1] == dense.path]
        other = [p for p in paths if p[0] == "params" and p not in own]
        plan[name] = dict(lora=lora, dense=dense, own=[p[-1] for p in own], other=other)
    return plan


def _structured_tile(adapted: Adapted, modules, plan, output_fn, kernel: str, trace: bool, inits: int | None = None,
                     start_layer: int = 0):
    """inits: None, the tile of one ``trainable`` tree; an int, of a tuple of that many inits sharing one forward
    (`module_ntks`), each module's kernel then a tuple of one per init. start_layer > 0: the model from that block
    on, from each batch's "prefix_hidden_BLD"."""
    model, scale = adapted.model, adapted.lora_scale
    count = 1 if inits is None else inits
    tapped = [n for n in modules if plan[n]["dense"] is not None and (plan[n]["lora"] or plan[n]["own"])]
    other_paths = [p for n in modules for p in plan[n]["other"]]
    kwargs = model_kwargs(output_fn)

    def outputs(trainable, frozen, probes, batch):
        out, inputs = adapted.tapped_apply(trainable, frozen, probes, batch["input_ids"], batch["attention_mask"],
                                           capture=tapped, **kwargs, **prefix_kwargs(start_layer, batch))
        return (out if output_fn is None else output_fn(out, batch)), inputs

    def factors(batch, trainable, frozen):
        """h (B, L, d_in) per module and g (O, B, L, d_out) per module (L = 1 for heads)."""
        _, h_shapes = jax.eval_shape(lambda: outputs(trainable, frozen, {}, batch))
        probes = {n: jnp.zeros(h.shape[:-1] + (model.module(n).d_out,), master_dtype(h.dtype))
                  for n, h in h_shapes.items()}  # float32 at least: a float32 head's cotangent is not rounded
        (out, inputs), vjp = jax.vjp(lambda p: outputs(trainable, frozen, p, batch), probes)
        _check_output(out.shape, output_fn)
        basis = jnp.eye(out.shape[1], dtype=out.dtype)

        def one(e):
            zero_inputs = jax.tree.map(jnp.zeros_like, inputs)
            return vjp((jnp.broadcast_to(e, out.shape), zero_inputs))[0]

        g = _ntk.map_over_outputs(one, basis)  # {module: (O, B, L, d_out)}
        # heads see (B, d_in) (the first/last token); give every module a token axis: (B, L, d), (O, B, L, d).
        # A bfloat16 model's h and g are cast to float32 here, before any contraction (docs/scaling.md)
        h = {n: at_least_float32(x.reshape(x.shape[0], -1, x.shape[-1])) for n, x in inputs.items()}
        g = {n: at_least_float32(x.reshape(x.shape[:2] + (-1, x.shape[-1]))) for n, x in g.items()}
        return h, g

    def lora_features(n, h, g, trainable):
        """Jacobian blocks of module n's LoRA factors from h, g: [∂f/∂B, ∂f/∂A], each (O, B, ...)."""
        if not plan[n]["lora"]:
            return []
        a, b = trainable["lora"][n]["a"], trainable["lora"][n]["b"]
        return [scale * jnp.einsum("blr,obld->obrd", h @ a, g),  # ∂f/∂B
                scale * jnp.einsum("bli,oblr->obir", h, g @ b.T)]  # ∂f/∂A

    def contract(f1, f2):
        f2 = _sign(f2) if kernel == "sign" else f2
        k = jnp.einsum("aip,bjp->ijab", f1.reshape(f1.shape[:2] + (-1,)), f2.reshape(f2.shape[:2] + (-1,)))
        return k

    def dense_weight(h1, g1, h2, g2):
        """Σ_{t,t'} (h_t·h'_t')(g_t·g'_t') for a dense weight trained in full (L × L form)."""
        hh = jnp.einsum("itd,jsd->ijts", h1, h2)
        return jnp.einsum("ijts,aitd,bjsd->ijab", hh, g1, g2)

    def other_jacobians(x, trainable, frozen):
        """Per-example Jacobians {path: (B, O, *shape)} of the leaves that are not dense-module weights."""
        if not other_paths:
            return {}
        flat = traverse_util.flatten_dict(trainable)
        sub = {p: flat[p] for p in other_paths}

        def f(sub_params, batch):
            merged = dict(flat)
            merged.update(sub_params)
            return outputs(traverse_util.unflatten_dict(merged), frozen, {}, batch)[0]

        return jax.vmap(lambda b: _ntk.jacrev_per_output(per_example(f))(sub, b))(x)

    def other_kernels(j1, j2):
        out = {}
        for n in modules:
            for p in plan[n]["other"]:
                a = j1[p].reshape(j1[p].shape[:2] + (-1,))
                b = j2[p].reshape(j2[p].shape[:2] + (-1,))
                b = _sign(b) if kernel == "sign" else b
                out[n] = out.get(n, 0) + jnp.einsum("iap,jbp->ijab", a, b)
        return out

    def rows(x, trainable, frozen):
        """Everything one block of examples contributes to a tile: per module its Jacobian features (LoRA
        factors of each init, bias) and, for a dense weight trained in full, (h, g); per other leaf its per-example
        Jacobian. ``trainable``: one tree, or a tuple of inits that share one forward (`module_ntks`), whose h and
        g, and so every feature but the LoRA factors', are those of the first."""
        trees = (trainable,) if inits is None else tuple(trainable)
        if len(trees) != count:
            raise ValueError(f"this tile takes {count} inits; got {len(trees)}")
        h, g = factors(x, trees[0], frozen)
        payload = {n: {"lora": [lora_features(n, h[n], g[n], t) for t in trees],
                       "bias": g[n].sum(axis=2) if "bias" in plan[n]["own"] else None,
                       "hg": (h[n], g[n]) if "kernel" in plan[n]["own"] else None} for n in h}
        return payload, other_jacobians(x, trees[0], frozen)

    def pair(rows1, rows2):
        (p1, j1), (p2, j2) = rows1, rows2
        extra = other_kernels(j1, j2)
        result = {}
        for n in modules:
            lora, after = [()] * count, []  # per init: its LoRA contractions; then the terms all inits share
            if n in p1:
                lora = [[contract(f1, f2) for f1, f2 in zip(l1, l2)] for l1, l2 in zip(p1[n]["lora"], p2[n]["lora"])]
                if p1[n]["bias"] is not None:
                    after.append(contract(p1[n]["bias"], p2[n]["bias"]))
                if p1[n]["hg"] is not None:
                    (h1, g1), (h2, g2) = p1[n]["hg"], p2[n]["hg"]
                    after.append(contract(jnp.einsum("bli,obld->obid", h1, g1), jnp.einsum("bli,obld->obid", h2, g2))
                                 if kernel == "sign" else dense_weight(h1, g1, h2, g2))
            ks = []
            for terms in lora:
                k = extra.get(n, 0)
                for t in (*terms, *after):
                    k = k + t
                ks.append(jnp.einsum("ijaa->ij", k) if trace else k)
            result[n] = ks[0] if inits is None else tuple(ks)
        return result

    return _gram.RowFactored(rows, pair)


def _jacobian_tile(adapted: Adapted, modules, output_fn, kernel: str, trace: bool, start_layer: int):
    f = adapted.as_function(output_fn, start_layer=start_layer)

    def jac(batch, trainable):
        per = jax.vmap(lambda b: _ntk.jacrev_per_output(per_example(f))(trainable, b))
        return traverse_util.flatten_dict(per(batch))  # leaf: (B, O, *shape)

    def tile(x1, x2, trainable, frozen):
        del frozen  # closed over by f through adapted; identical by construction
        j1 = jac(x1, trainable)
        j2 = j1 if x2 is None else jac(x2, trainable)
        result = {}
        for n in modules:
            k = 0
            for p in adapted.groups[n]:
                a = j1[p].reshape(j1[p].shape[:2] + (-1,))
                b = j2[p].reshape(j2[p].shape[:2] + (-1,))
                b = _sign(b) if kernel == "sign" else b
                k = k + jnp.einsum("iap,jbp->ijab", a, b)
            result[n] = jnp.einsum("ijaa->ij", k) if trace else k
        return result

    return tile


def _ntvp_tile(adapted: Adapted, modules, output_fn, trace: bool, start_layer: int):
    f = adapted.as_function(output_fn, start_layer=start_layer)

    def tile(x1, x2, trainable, frozen):
        del frozen
        x2 = x1 if x2 is None else x2
        out2, vjp2 = jax.vjp(lambda t: f(t, x2), trainable)
        n2, o = out2.shape
        basis = jnp.eye(n2 * o, dtype=out2.dtype).reshape(n2 * o, n2, o)
        cotangents = _ntk.map_over_outputs(lambda e: vjp2(e)[0], basis)  # each leaf (n2·O, *shape)
        result = {}
        for n in modules:
            keep = set(adapted.groups[n])
            masked = jax.tree_util.tree_map_with_path(  # keeps empty subtrees, unlike a flatten/unflatten trip
                lambda path, v: v if tuple(k.key for k in path) in keep else jnp.zeros_like(v), cotangents)
            cols = jax.vmap(lambda t: jax.jvp(lambda q: f(q, x1), (trainable,), (t,))[1])(masked)
            k = cols.reshape(n2, o, -1, o).transpose(2, 0, 3, 1)  # (n1, n2, O, O)
            result[n] = jnp.einsum("ijaa->ij", k) if trace else k
        return result

    return tile


_TILES: "weakref.WeakKeyDictionary[Adapted, dict]" = weakref.WeakKeyDictionary()


def tile_function(adapted, modules, output_fn, kernel, trace, implementation, inits: int | None = None,
                  start_layer: int = 0):
    """One tile function per request, kept while ``adapted`` lives, so a second call does not recompile."""
    cache = _TILES.setdefault(adapted, {})
    key = (modules, output_fn, kernel, trace, implementation, inits, start_layer)
    if key not in cache:
        if implementation == "structured":
            cache[key] = _structured_tile(adapted, modules, _group_leaves(adapted, modules), output_fn, kernel,
                                          trace, inits, start_layer)
        elif implementation == "jacobian_contraction":
            cache[key] = _jacobian_tile(adapted, modules, output_fn, kernel, trace, start_layer)
        else:
            cache[key] = _ntvp_tile(adapted, modules, output_fn, trace, start_layer)
    return cache[key]


def module_ntks(adapted: Adapted, batch1, batch2=None, *, trace_axes=(-1,), kernel: str = "ntk",
                implementation: str = "auto", modules: Sequence[str] | None = None, trainable=None,
                output_fn: Optional[Callable] = None, block_size: int | None = None,
                accumulate_dtype=np.float64, progress: bool = False, checkpoint_dir: str | None = None,
                key: str = "", mesh=None, sharding: _gram.ShardingSpec = _gram.ShardingSpec(),
                reduce: str = "sum", cache_bytes: int | None = None, start_layer: int = 0) -> dict[str, np.ndarray]:
    """``{module: K_m}`` for every name in ``adapted.modules`` (or ``modules``), at ``trainable`` (default θ0).

    ``trainable`` may also be a list of trees (several LoRA inits, e.g. one per seed): the result is then a list
    of such dicts, one per tree. Where the trees differ only in their LoRA A factors and every LoRA B is zero (the
    usual init, B0 = 0), the model's function, and so every forward and backward pass, is the same for all of
    them: one pass serves every init and only the LoRA features are formed per init (implementation
    "structured", no mesh). Otherwise each tree is a call of its own (tile checkpoints in
    ``<checkpoint_dir>/init<i>``).

    ``batch``: a mapping with ``input_ids`` and ``attention_mask`` (N, L) (real lengths, bucketed padding).
    ``trace_axes=(-1,)`` gives (N1, N2) kernels (outputs summed, or averaged with ``reduce="mean"``);
    ``trace_axes=()`` gives (N1, N2, O, O). ``kernel``: "ntk" or "sign". Host numpy arrays of
    ``accumulate_dtype`` (float64 needs ``jax_enable_x64``; otherwise the tiles are float32 and only the sum on
    the host is float64). Tiling/resume/sharding arguments: ``jaxlin.gram.blocked_gram``; with
    implementation="structured" each row block's forward/backward passes run once and their features are kept
    for every tile that needs them, up to ``cache_bytes`` (then recomputed per tile; None: a quarter of the
    device's memory where it reports one, else 2 GiB). ``block_size=None`` is one tile of every row: on a CPU,
    blocks of 32–64 examples are faster (MiniLM, N = 256: 10.3 s in blocks of 64, 25.0 s as one tile).

    ``start_layer`` > 0: the model from that block on (`jaxlin.prefix`), each batch carrying the hidden states
    entering it, "prefix_hidden_BLD" (`FrozenPrefix.attach`, so right-padded); every module must lie at or above
    it. The blocks below then run once per example, in the prefix, not in every kernel pass: the same kernels up
    to float rounding.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    if kernel not in _ntk.KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {_ntk.KERNELS}")
    if reduce not in _ntk.REDUCES:
        raise ValueError(f"reduce={reduce!r} is not one of {_ntk.REDUCES}")
    if tuple(trace_axes) not in ((), (-1,), (1,)):
        raise ValueError(f"trace_axes={trace_axes!r}: module kernels support () (full (N1, N2, O, O)) or (-1,)")
    if not 0 <= start_layer <= adapted.model.num_layers:
        raise ValueError(f"start_layer={start_layer} must lie in [0, {adapted.model.num_layers}] (the model's blocks)")
    keys = ("input_ids", "attention_mask") + ((PREFIX_KEY,) if start_layer else ())
    for b, name in ((batch1, "batch1"), (batch2, "batch2")):
        if b is not None and not set(keys) <= set(b):
            raise ValueError(f"{name} must be a mapping with {list(keys)}; got keys {list(b)}" + (
                f" (start_layer={start_layer}: pass FrozenPrefix.attach(batch))" if start_layer else ""))
        if b is not None:
            check_inputs(adapted.model, b["input_ids"], b["attention_mask"])
    if isinstance(trainable, (list, tuple)):
        return _several_inits(adapted, batch1, batch2, list(trainable), dict(
            trace_axes=trace_axes, kernel=kernel, implementation=implementation, modules=modules, output_fn=output_fn,
            block_size=block_size, accumulate_dtype=accumulate_dtype, progress=progress,
            checkpoint_dir=checkpoint_dir, key=key, mesh=mesh, sharding=sharding, reduce=reduce,
            cache_bytes=cache_bytes, start_layer=start_layer))
    modules = tuple(adapted.modules if modules is None else modules)
    unknown = [m for m in modules if m not in adapted.groups]
    if unknown:
        raise ValueError(f"modules {unknown} are not trainable in this adapted model; choose from {adapted.modules}")
    below = [m for m in modules if adapted.lowest_block(adapted.groups[m]) < start_layer]
    if below:  # the prefix's blocks are inputs here: their parameters would get no gradient
        raise ValueError(f"modules {below} lie below start_layer={start_layer}; pass a start_layer at or below "
                         f"their lowest block")
    trace = tuple(trace_axes) != ()
    trainable = adapted.trainable if trainable is None else trainable
    if implementation == "auto":
        implementation = "structured"
    if kernel == "sign" and implementation == "ntk_vector_products":
        raise ValueError("kernel='sign' is not available with implementation='ntk_vector_products'; "
                         "use 'structured' or 'jacobian_contraction'")
    inits = len(trainable.inits) if isinstance(trainable, _Inits) else None
    tile = tile_function(adapted, modules, output_fn, kernel, trace, implementation, inits, start_layer)
    trainable = trainable if inits is None else tuple(trainable.inits)
    x1 = {k: jnp.asarray(batch1[k]) for k in keys}
    x2 = None if batch2 is None else {k: jnp.asarray(batch2[k]) for k in keys}
    symmetric = x2 is None and kernel == "ntk"
    if x2 is None and not symmetric:
        x2 = x1
    out = _gram.blocked_gram(tile, x1, x2, block_size=block_size, args=(trainable, adapted.frozen),
                             symmetric=symmetric, accumulate_dtype=accumulate_dtype, progress=progress,
                             checkpoint_dir=checkpoint_dir, key=key, mesh=mesh, sharding=sharding,
                             diagonal_as_none=True, cache_bytes=cache_bytes)
    # the pytree round trip sorted the keys; with several inits, module → a tuple of one kernel per init
    outs = [{n: out[n] if inits is None else out[n][i] for n in modules} for i in range(inits or 1)]
    if trace and reduce == "mean":
        first = trainable if inits is None else trainable[0]
        f = adapted.as_function(output_fn, start_layer=start_layer)
        o = jax.eval_shape(f, first, x1).shape[-1]
        outs = [{n: k / o for n, k in out.items()} for out in outs]
    return outs[0] if inits is None else outs


@dataclasses.dataclass(frozen=True)
class _Inits:
    """Several trainable trees that share one forward (`_shares_forward`), for one structured pass."""
    inits: tuple


def _shares_forward(trees) -> bool:
    """Whether the trees differ only in LoRA A factors and every LoRA B is zero: the model's function is then the
    same for all of them (its adapters add s·x·A·B = 0), and so is every forward and backward pass."""
    flat = [traverse_util.flatten_dict(t) for t in trees]
    if any(f.keys() != flat[0].keys() for f in flat):
        return False
    for path, first in flat[0].items():
        values = [np.asarray(f[path]) for f in flat]
        if path[0] == "lora" and path[-1] == "b":
            if any(v.any() for v in values):
                return False
        elif not (path[0] == "lora" and path[-1] == "a") and not all(np.array_equal(v, values[0]) for v in values):
            return False
    return True


def _several_inits(adapted, batch1, batch2, trees, kw) -> list[dict[str, np.ndarray]]:
    """`module_ntks` of each tree in ``trees``: one shared pass where they share a forward, else one call each."""
    if not trees:
        raise ValueError("module_ntks(trainable=[]): pass a trainable tree, or a non-empty list of them")
    shared = (kw["implementation"] in ("auto", "structured") and kw["mesh"] is None and len(trees) > 1
               and _shares_forward(trees))
    if shared:
        return module_ntks(adapted, batch1, batch2, trainable=_Inits(tuple(trees)), **kw)
    directory = kw.pop("checkpoint_dir")
    return [module_ntks(adapted, batch1, batch2, trainable=t, checkpoint_dir=None if directory is None else
                        os.path.join(directory, f"init{i}"), **kw) for i, t in enumerate(trees)]


def _structured_builder(f, spec: _ntk.KernelSpec):
    """``empirical_ntk_fn(f, implementation="structured")`` for ``f = adapted.as_function()`` (ungated; from block
    ``f.start_layer`` on for a frozen prefix's function, `jaxlin.prefix`): the sum of the module kernels of one
    tile (pure and jit-able; no host-side tiling). Other functions, a gated one included, are refused (use
    module_ntks on the ungated model)."""
    if not isinstance(f, AdaptedFunction) or f.gate_M is not None:
        raise ValueError(_ntk.STRUCTURED_NEEDS_MODEL)
    adapted, modules = f.adapted, f.adapted.modules
    tile = _structured_tile(adapted, modules, _group_leaves(adapted, modules), f.output_fn, spec.kernel,
                            trace=bool(spec.trace_axes), start_layer=f.start_layer)

    def ntk(x1, x2, params):
        k = sum(tile(x1, x2, params, f.frozen).values())
        if spec.trace_axes and spec.reduce == "mean":
            k = k / jax.eval_shape(f, params, x1).shape[-1]
        return k if spec.accumulate_dtype is None else k.astype(spec.accumulate_dtype)

    return ntk


_ntk.register_implementation("structured", _structured_builder)

__all__ = ["module_ntks", "IMPLEMENTATIONS"]
