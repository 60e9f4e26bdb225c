"""Model families as Flax NNX modules, and ``load_pretrained`` which turns a checkpoint into a pure function.

Families register themselves with a ``FAMILY`` dict: the HF ``model_type`` values they build, their ``kind``
(``"encoder"`` or ``"decoder"``, see `family_kind`), a ``build`` function, the tasks they support, backbone prefixes a bare checkpoint may lack, tensors other tasks leave
behind that are safe to ignore and, for learned positions, ``max_length(config)`` (see ``check_inputs``).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from . import checkpoint
from .base import Model, ModuleInfo, check_inputs, make_apply, module_infos
from .checkpoint import CheckpointError
from .tokenizer import Tokenizer

TASKS = ("encoder", "classification", "causal_lm")
DTYPES = ("float32", "bfloat16")  # the run's `model.dtype`: compute dtype of the base weights (docs/scaling.md)
_FAMILY_MODULES = ("bert", "gpt2", "llama")


def families() -> dict[str, dict]:
    """model_type -> family spec, for every family module present."""
    out = {}
    for mod in _FAMILY_MODULES:
        try:
            fam = importlib.import_module(f"{__name__}.{mod}").FAMILY
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        out.update({t: fam for t in fam["model_types"]})
    return out


def family_for(config) -> dict:
    fams = families()
    model_type = getattr(config, "model_type", None)
    if model_type not in fams:
        raise CheckpointError(f"unknown architecture model_type={model_type!r}; jaxlin supports "
                              f"{sorted(fams)}")
    return fams[model_type]


def family_kind(source) -> str:
    """``"encoder"`` or ``"decoder"``: the registered kind of checkpoint ``source``'s family, read from its
    config.json (a ``.gguf`` file is a llama-architecture decoder: the only GGUF architecture jaxlin reads);
    no weights are loaded. Raises CheckpointError for an unknown architecture."""
    resolved = checkpoint.resolve(source)
    return families()["llama" if resolved.kind == "gguf" else _model_type(resolved)]["kind"]


def _model_type(resolved) -> str:
    """The ``model_type`` of a checkpoint directory's config.json, refused (CheckpointError naming the file) when
    jaxlin has no family for it, or the JSON is broken."""
    model_type = checkpoint.read_config_json(resolved.path).get("model_type")
    if model_type not in families():
        raise CheckpointError(f"unknown architecture model_type={model_type!r} in {resolved.path / 'config.json'}; "
                              f"jaxlin supports {sorted(families())}")
    return model_type


def build_model(config, *, task: str, num_labels: int | None = None, seed: int = 0, dtype=jnp.float32,
                head: str | None = None) -> nnx.Module:
    """A randomly initialised NNX model for a transformers config (used by tests and the loader)."""
    fam = family_for(config)
    _check_task(task, fam, num_labels)
    return fam["build"](config, task=task, num_labels=num_labels, head=head, rngs=nnx.Rngs(seed),
                        dtype=jnp.dtype(dtype))


def _check_task(task, fam, num_labels):
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    if task not in fam["tasks"]:
        raise ValueError(f"task={task!r} is not available for the {fam['name']} family; use one of {fam['tasks']}")
    if task == "classification" and (num_labels is None or int(num_labels) < 1):
        raise ValueError(f"task='classification' needs num_labels ≥ 1 (got {num_labels!r}); e.g. num_labels=2")


def from_nnx(module: nnx.Module, *, config, family: str, task: str, tokenizer=None, source: str = "",
             new_tensors=()) -> Model:
    """Split an NNX model once into a pure ``apply`` and a plain params dict."""
    graphdef, state = nnx.split(module)
    return Model(apply=make_apply(graphdef, config), params=nnx.to_pure_dict(state), config=config, tokenizer=tokenizer,
                 family=family, task=task, modules=module_infos(module), graphdef=graphdef, source=source,
                 new_tensors=tuple(new_tensors), kind=family_for(config)["kind"])


def read_hf_config(resolved):
    """The transformers config of a `checkpoint.resolve`d source, no weight read: a GGUF file's metadata or a
    directory's config.json; a CheckpointError naming the file for broken JSON, an architecture jaxlin has no
    family for, or a config transformers rejects."""
    if resolved.kind == "gguf":
        from . import gguf_loader

        return gguf_loader.read_gguf_config(resolved.path)
    from transformers import AutoConfig

    model_type = _model_type(resolved)
    try:
        return AutoConfig.from_pretrained(resolved.path)
    except Exception as e:  # transformers validates configs strictly and raises many types
        raise CheckpointError(f"{resolved.path / 'config.json'} is not a valid {model_type} config: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def load_pretrained(source, *, task: str, num_labels: int | None = None, seed: int = 0, dtype=jnp.float32,
                    head: str | None = None, mesh: jax.sharding.Mesh | None = None, rules=None) -> Model:
    """Load a checkpoint as a pure JAX function.

    ``source``: a packaged name (``"all-MiniLM-L6-v2"``, ``"SmolLM2-135M-Instruct"``), a Hugging Face
    directory (config.json + safetensors, sharded or not), a ``.gguf`` file, or a hub id (needs a network).
    ``task``: "encoder" (hidden states (B, L, D)), "classification" (logits (B, C); a head missing from the
    checkpoint is initialised from ``seed`` and listed in ``model.new_tensors``) or "causal_lm" ((B, L, V)).
    ``head``: the classification head for encoders, "roberta" (dense+tanh+out_proj) or "bert" (pooler+linear);
    default by model type. Decoders classify from the last real token with a linear ``score`` head.
    ``dtype`` (or its name, e.g. "bfloat16"): the base weights' dtype; a half-precision one is also their compute
    dtype, and the heads stay float32 (mixed precision, docs/scaling.md).
    ``mesh``, ``rules``: place every parameter with its ``NamedSharding`` (`jaxlin.sharding.param_shardings`,
    default rules `jaxlin.sharding.DEFAULT_RULES`; docs/scaling.md). From safetensors each process reads only
    the slices its own devices hold (``safe_open(...).get_slice`` inside ``jax.make_array_from_callback``),
    so a checkpoint larger than one device, or than one host's memory for the whole model, loads. A GGUF
    file is dequantized one whole tensor at a time on every process and then cut into its shards.
    """
    resolved = checkpoint.resolve(source)
    if resolved.kind == "gguf":
        from . import gguf_loader

        config, tensors, hf_tokenizer = gguf_loader.read_gguf(resolved.path)
    else:
        from transformers import AutoTokenizer

        config = read_hf_config(resolved)
        tensors = checkpoint.SafetensorsReader(resolved.path)
        hf_tokenizer = AutoTokenizer.from_pretrained(resolved.path) if _has_tokenizer(resolved.path) else None
    fam = family_for(config)
    if task == "classification" and num_labels is None:
        num_labels = getattr(config, "num_labels", None) if _has_head_tensor(tensors) else None
    _check_task(task, fam, num_labels)
    dtype = jnp.dtype(dtype)

    def make(rng_seed):
        return fam["build"](config, task=task, num_labels=num_labels, head=head, rngs=nnx.Rngs(rng_seed),
                            dtype=dtype)

    abstract = nnx.eval_shape(lambda: make(seed))
    shardings = None
    if mesh is not None:
        from .. import sharding

        shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
        shardings = sharding.flat_shardings(fam["name"], shapes, mesh, rules)
    params, missing = _fill_params(abstract, tensors, fam, shardings)
    if missing:  # only heads may be missing; take them from a seeded random init
        concrete = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(make(seed))))
        for path in missing.values():
            params[path] = concrete[path] if shardings is None else sharding.place(concrete[path], shardings[path])
    graphdef = nnx.graphdef(abstract)
    tok = Tokenizer(hf_tokenizer) if hf_tokenizer is not None else None
    return Model(apply=make_apply(graphdef, config), params=traverse_util.unflatten_dict(params), config=config,
                 tokenizer=tok, family=fam["name"], task=task, modules=module_infos(abstract), graphdef=graphdef,
                 source=str(source), new_tensors=tuple(sorted(missing)), kind=fam["kind"])


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"))


def _has_head_tensor(tensors) -> bool:
    return any(k.startswith(("classifier.", "score.")) for k in tensors)


HEAD_PREFIXES = ("classifier", "score", "pooler")


def _fill_params(abstract: nnx.Module, tensors, fam: dict, shardings: dict | None = None) -> tuple[dict, dict]:
    """Read every parameter of ``abstract`` from ``tensors`` by its HF name, in the dtype ``abstract`` gives it.
    Returns the flat params and ``{hf_name: path}`` of head tensors the checkpoint lacks. Raises CheckpointError
    naming a missing, misshapen or unexpected tensor. With ``shardings`` ({path: NamedSharding}), each parameter
    is built on its sharding from the slices this process's devices hold (read from the file where ``tensors``
    can read slices)."""
    available = set(tensors)
    prefixes = fam["backbone_prefixes"]
    has_prefix = any(k.startswith(prefixes) for k in available)
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    params, missing, used = {}, {}, set()
    for path, node in nnx.iter_modules(abstract):
        if not hasattr(node, "hf_params"):
            continue
        for attr, suffix, transform in node.hf_params():
            hf_key = f"{node.hf_name}.{suffix}"
            key = _lookup(hf_key, available, prefixes, has_prefix)
            ppath = tuple(path) + (attr,)
            expected, dtype = shapes[ppath].shape, shapes[ppath].dtype
            if key is None:
                bare = hf_key.split(".", 1)[-1] if hf_key.startswith(prefixes) else hf_key
                if bare.startswith(HEAD_PREFIXES) or hf_key.startswith(HEAD_PREFIXES) or \
                        fam.get("optional", lambda k: False)(hf_key):
                    missing[hf_key] = ppath
                    continue
                raise CheckpointError(f"tensor {hf_key!r} (shape {expected}) is missing from the checkpoint; "
                                      "is the config.json the one these weights were saved with?")
            sliced = shardings is not None and hasattr(tensors, "read")
            full = None if sliced else np.asarray(tensors[key])
            hf_shape = tensors.shape(key) if sliced else full.shape
            if tuple(hf_shape) != _hf_shape(expected, node, attr):
                raise CheckpointError(f"tensor {key!r} has shape {tuple(hf_shape)}, expected "
                                      f"{_hf_shape(expected, node, attr)} for this config"
                                      + (" (a head for another number of labels? pass num_labels to match)"
                                         if hf_key.startswith(HEAD_PREFIXES) else ""))
            if shardings is None:
                params[ppath] = jnp.asarray(np.asarray(transform(full)), dtype)
            else:
                params[ppath] = _sharded_tensor(tensors, key, full, transform, _transposed(node, attr), tuple(expected),
                                                shardings[ppath], dtype)
            used.add(key)
    extra = sorted(k for k in available - used if not any(re.search(p, k) for p in fam["ignorable"]))
    if extra:
        raise CheckpointError(f"the checkpoint has {len(extra)} tensor(s) this {fam['name']} model does not use, "
                              f"e.g. {extra[:5]}; check num_hidden_layers and the architecture in config.json")
    return params, missing


def _sharded_tensor(tensors, key, full, transform, transposed: bool, shape, sharding, dtype) -> jax.Array:
    """The parameter ``transform(tensors[key])`` of ``shape`` on ``sharding``, built shard by shard: each of
    this process's devices gets its slice, read from the file (``tensors.read``) or cut from ``full``; a
    slice several devices share is read once."""
    pieces = {}

    def piece(index):
        hf_index = tuple(reversed(index)) if transposed else tuple(index)
        memo = tuple((s.start, s.stop, s.step) for s in hf_index)
        if memo not in pieces:
            raw = tensors.read(key, hf_index) if full is None else full[hf_index]
            pieces[memo] = np.asarray(transform(np.asarray(raw))).astype(dtype)
        return pieces[memo]

    return jax.make_array_from_callback(shape, sharding, piece)


def _lookup(hf_key, available, prefixes, has_prefix):
    if hf_key in available:
        return hf_key
    for p in prefixes:  # a bare backbone saved without the task model's prefix ("encoder.layer.0..." for bert.)
        if hf_key.startswith(p) and hf_key[len(p):] in available and not has_prefix:
            return hf_key[len(p):]
    for old, new in ((".weight", ".gamma"), (".bias", ".beta")):  # old BERT LayerNorm names
        if "LayerNorm" in hf_key and hf_key.endswith(old):
            alt = _lookup(hf_key[: -len(old)] + new, available, prefixes, has_prefix) if new != old else None
            if alt:
                return alt
    return None


def _transposed(node, attr) -> bool:
    """Whether the HF tensor of ``node.attr`` is stored transposed (nn.Linear's (d_out, d_in))."""
    return attr == "kernel" and getattr(node, "hf_transpose", False)


def _hf_shape(shape, node, attr):
    return tuple(reversed(shape)) if _transposed(node, attr) else tuple(shape)


__all__ = ["Model", "ModuleInfo", "CheckpointError", "check_inputs", "Tokenizer", "load_pretrained", "build_model",
           "from_nnx", "families", "family_for", "family_kind", "TASKS"]
