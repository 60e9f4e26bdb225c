"""What is fine-tuned: LoRA adapters and parameter selections, as pure transforms of the params pytree.

``adapt`` splits a model's parameters into two plain pytrees:

- ``trainable = {"lora": {module: {"a": (d_in, R), "b": (R, d_out)}}, "params": <selected base leaves>}``
- ``frozen``: every other base parameter (the selected leaves are absent from it),

and returns ``apply(trainable, frozen, input_ids, attention_mask)``, which runs the model with each adapter
unmerged: an adapted dense module computes x·W + (alpha/R)·(x·A)·B (``jaxlin.models.layers.Linear``, whose
params then hold ``lora_a``/``lora_b`` next to ``kernel``), so neither a step nor its gradient forms a
d_in × d_out weight. With B = 0 the adapter adds an exact zero, so the adapted model at init equals the base
model to the last bit. ``Adapted.merge`` folds the adapters, W + (alpha/R)·A·B, for export and for merged
inference (``adapted.model.apply(adapted.merge(trainable), ids, mask)``). Kernels of the dense module are
stored (d_in, d_out), so ``a`` is peft's ``lora_A.weight`` transposed and ``b`` is ``lora_B.weight`` transposed.

``adapted.modules`` names the trainable groups in a stable order (blocks in order, heads last): a LoRA
module, a dense module trained in full, or another parameterised block (a LayerNorm, an embedding).
Per-module kernels (``jaxlin.module_ntks``) use exactly these groups.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from .config import ConfigError
from .models.base import Model, make_apply
from .models.layers import Linear, master_dtype, tapping

LORA_INITS = ("peft", "gaussian")
HEAD_MODULE_PREFIXES = ("classifier", "score", "lm_head")
# transformers class the adapter is for -> peft task_type (SEQ_CLS only with a saved head); module names follow
# the class (see save_peft)
PEFT_MODEL_CLASSES = {"AutoModel": "FEATURE_EXTRACTION", "AutoModelForSequenceClassification": "SEQ_CLS",
                      "AutoModelForCausalLM": "CAUSAL_LM"}
_TASK_MODEL_CLASS = {"encoder": "AutoModel", "classification": "AutoModelForSequenceClassification",
                     "causal_lm": "AutoModelForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA on the dense modules matching ``targets`` in ``layers`` (None = all layers).

    ``targets``: projection names (``"query"``, ``"q_proj"``, ``"c_attn"``), dotted suffixes
    (``"attention.output.dense"``), full names or globs (``"layer*.mlp.*"``); a lone string is one target, a
    lone int one layer. ``alpha``/``rank`` is the scale; ``rank`` is at most each target's min(d_in, d_out).
    Bad targets, layers or ranks raise ``jaxlin.config.ConfigError`` naming the valid ones.
    ``init``: "peft" (A ~ U(±1/√d_in), peft's kaiming-uniform default; B = 0) or "gaussian" (A ~ N(0, 1/R),
    B = 0). The A of a module depends only on ``seed`` and that module, not on which others are adapted.
    """

    targets: Sequence[str] = ("query", "key", "value")
    layers: Iterable[int] | None = None
    rank: int = 8
    alpha: float = 8.0
    init: str = "peft"
    seed: int = 0
    use_rslora: bool = False  # scale alpha/√R instead of alpha/R

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        layers = (self.layers,) if isinstance(self.layers, (int, np.integer)) else self.layers
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "layers", None if layers is None else tuple(layers))

    @property
    def scale(self) -> float:
        return float(self.alpha) / (float(np.sqrt(self.rank)) if self.use_rslora else float(self.rank))


@dataclasses.dataclass(frozen=True, eq=False)
class Adapted:
    model: Model
    trainable: Any
    frozen: Any
    groups: dict  # module name -> tuple of leaf paths inside `trainable`
    lora: LoRA | None
    lora_modules: tuple[str, ...]
    run: Callable  # the model's apply for its graph with the LoRA factors in the adapted modules (`params`)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.groups)

    @property
    def lora_scale(self) -> float:
        return self.lora.scale if self.lora is not None else 1.0

    def _base(self, trainable, frozen) -> dict:
        """Flat base params: ``frozen`` with the trainable base leaves put back."""
        trainable = self.trainable if trainable is None else trainable
        flat = traverse_util.flatten_dict(self.frozen if frozen is None else frozen)
        flat.update(traverse_util.flatten_dict(trainable.get("params", {})))
        return flat

    def params(self, trainable=None, frozen=None):
        """Params of the adapted graph (``run``): the base params with each module's LoRA factors beside its
        kernel as ``lora_a``/``lora_b``, not folded in."""
        trainable = self.trainable if trainable is None else trainable
        flat = self._base(trainable, frozen)
        for name, ab in trainable.get("lora", {}).items():
            path = self.model.module(name).path
            flat[path + ("lora_a",)], flat[path + ("lora_b",)] = ab["a"], ab["b"]
        return traverse_util.unflatten_dict(flat)

    def merge(self, trainable=None, frozen=None):
        """Full base-model params with the trainable leaves put back and every adapter folded in, for export
        and merged inference with ``self.model.apply``."""
        trainable = self.trainable if trainable is None else trainable
        flat = self._base(trainable, frozen)
        for name, ab in trainable.get("lora", {}).items():
            path = self.model.module(name).path + ("kernel",)
            flat[path] = flat[path] + self.lora_scale * (ab["a"] @ ab["b"]).astype(flat[path].dtype)
        return traverse_util.unflatten_dict(flat)

    def apply(self, trainable, frozen, input_ids, attention_mask, **kwargs):
        """The model's apply (which checks concrete inputs, `jaxlin.models.check_inputs`) with the adapters
        unmerged."""
        return self.run(self.params(trainable, frozen), input_ids, attention_mask, **kwargs)

    def tapped_apply(self, trainable, frozen, probes, input_ids, attention_mask, *, capture=(), **kwargs):
        """`jaxlin.models.Model.tapped_apply` of the adapted model: probes at module outputs (after the
        adapter), inputs of the ``capture`` modules returned."""
        with tapping(probes, capture) as state:
            out = self.apply(trainable, frozen, input_ids, attention_mask, **kwargs)
        return out, dict(state.inputs)

    def gated(self, trainable, gate_M):
        """``trainable`` with LoRA module i's factors entering as g_i·x + (1 − g_i)·stop_gradient(x): the same
        values, with zero gradient where g_i = 0 (the gate of `as_function`, in `lora_modules` order)."""
        lora = {m: {k: gate_M[i] * v + (1 - gate_M[i]) * jax.lax.stop_gradient(v)
                    for k, v in trainable["lora"][m].items()} for i, m in enumerate(self.lora_modules)}
        return {**trainable, "lora": lora}

    def as_function(self, output_fn: Callable | None = None, gate=None, start_layer: int = 0) -> "AdaptedFunction":
        """``f(trainable, batch) -> outputs`` of this model (see `AdaptedFunction`), the one form in which
        kernels, training, the probe, the study and the pipeline take an adapted model.

        ``output_fn(outputs, batch)`` maps the model's outputs to (B, O) (e.g. label-word logits of a causal
        LM); ``gate``: 0/1 per LoRA module of ``lora_modules``: module i trains iff gate[i] = 1 (its factors
        enter as g·x + (1 − g)·stop_gradient(x), the same value, with zero gradient where g = 0); ``start_layer``:
        the model from that block on, from each batch's "prefix_hidden_BLD" (`jaxlin.prefix`)."""
        if gate is not None:
            gate, n = np.asarray(gate), len(self.lora_modules)
            if not n:
                raise ValueError("gate= switches LoRA modules, and this adapted model has none; adapt with "
                                 "lora=LoRA(...) or leave gate=None")
            if gate.shape != (n,) or not np.all((gate == 0) | (gate == 1)):
                raise ValueError(f"gate must be {n} values in {{0, 1}}, one per LoRA module of lora_modules; got "
                                 f"{gate}")
            gate = jnp.asarray(gate, self.trainable["lora"][self.lora_modules[0]]["a"].dtype)
        return AdaptedFunction(self, self.frozen, output_fn, gate, start_layer)

    def first_trained_layer(self, gate_M=None) -> int:
        """The lowest block that holds a trained parameter (``model.num_layers`` when only the head trains). The
        blocks below it compute the same hidden states whatever the trainable values, so `jaxlin.prefix` computes
        them once. ``gate_M``: LoRA module i trains iff gate_M[i] = 1 (`as_function`'s gate); None: all of them."""
        gate = np.ones(len(self.lora_modules)) if gate_M is None else np.asarray(gate_M)
        paths = [("lora", m) for m, g in zip(self.lora_modules, gate) if g]
        return self.lowest_block(paths + [("params", *p) for p in
                                          traverse_util.flatten_dict(self.trainable.get("params", {}))])

    def lowest_block(self, paths) -> int:
        """The lowest block holding one of the trainable leaves at ``paths`` (("lora", module, …) or ("params",
        …), as in `groups`): a LoRA module's layer, a block parameter's block, 0 for any other parameter that is
        not a head's (embeddings, their norm), ``model.num_layers`` for a head's or for none."""
        heads = {m.path for m in self.model.modules if m.layer is None and m.name.startswith(HEAD_MODULE_PREFIXES)}
        n = self.model.num_layers
        blocks = [n]
        for path in paths:
            if path[0] == "lora":
                layer = self.model.module(path[1]).layer
                blocks.append(n if layer is None else layer)
            elif path[1] == "layers":
                blocks.append(path[2])
            elif not any(path[1:1 + len(h)] == h for h in heads):
                blocks.append(0)
        return min(blocks)

    def num_params(self, name: str | None = None) -> int:
        flat = traverse_util.flatten_dict(self.trainable)
        paths = self.groups[name] if name is not None else flat.keys()
        return int(sum(np.prod(flat[p].shape) for p in paths))

    def count_by_module(self) -> dict[str, int]:
        return {name: self.num_params(name) for name in self.groups}


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptedFunction:
    """``f(trainable, batch) -> outputs (B, O)`` of an adapted model, made by `Adapted.as_function`; ``batch``
    holds "input_ids" and "attention_mask" (other keys reach ``output_fn`` only).

    A pytree: its leaves are the frozen weights and the gate, so passed to a jit as an argument they are inputs
    of the program, not constants baked into it; ``adapted`` and ``output_fn`` are static (compared by
    identity), so functions of one adapted model share compiled programs. Per-module kernels read ``adapted``
    (``empirical_ntk_fn(f, implementation="structured")``)."""

    adapted: Adapted
    frozen: Any
    output_fn: Callable | None = None
    gate_M: Any = None
    start_layer: int = 0  # > 0: blocks from this one on, from the batch's "prefix_hidden_BLD" (`jaxlin.prefix`)

    def __call__(self, trainable, batch):
        if self.gate_M is not None:
            trainable = self.adapted.gated(trainable, self.gate_M)
        out = self.adapted.apply(trainable, self.frozen, batch["input_ids"], batch["attention_mask"],
                                 **model_kwargs(self.output_fn), **prefix_kwargs(self.start_layer, batch))
        return out if self.output_fn is None else self.output_fn(out, batch)

    def hidden(self, trainable, batch, stop_layer: int):
        """(B, L, D): the hidden states entering block ``stop_layer`` (from the embeddings, or from block
        ``start_layer`` on the batch's "prefix_hidden_BLD")."""
        return self.adapted.apply(trainable, self.frozen, batch["input_ids"], batch["attention_mask"],
                                  stop_layer=stop_layer, **prefix_kwargs(self.start_layer, batch))


jax.tree_util.register_dataclass(AdaptedFunction, data_fields=["frozen", "gate_M"],
                                 meta_fields=["adapted", "output_fn", "start_layer"])


PREFIX_KEY = "prefix_hidden_BLD"  # a batch's hidden states entering its model function's first block (jaxlin.prefix)


def prefix_kwargs(start_layer: int, batch) -> dict:
    """The model call's keyword arguments to run from block ``start_layer`` on the batch's hidden states entering
    it (none from block 0)."""
    return {"start_layer": start_layer, "hidden_BLD": batch[PREFIX_KEY]} if start_layer else {}


def model_kwargs(output_fn: Callable | None) -> dict:
    """Keyword arguments ``output_fn`` asks the model call for (its ``model_kwargs``: `jaxlin.label_word_readout`'s
    asks for its label token ids only, so the model never builds (B, L, V) logits); none for plain functions."""
    return dict(getattr(output_fn, "model_kwargs", None) or {})


def adapt(model: Model, *, lora: LoRA | None = None, layers: Iterable[int] | None = None,
          modules: Sequence[str] | None = None, biases: bool = False, head: bool = False,
          dtype=None) -> Adapted:
    """Choose what is fine-tuned. Combine freely: ``lora`` adapters, whole blocks ``layers`` (every parameter of
    those blocks), dense ``modules`` trained in full (same patterns as LoRA targets), all ``biases`` (BitFit),
    and the classification/LM ``head``. Raises ValueError naming a pattern or layer that selects nothing."""
    flat = traverse_util.flatten_dict(model.params)
    chosen = set()
    if layers is not None:
        wanted = _check_layers(model, layers)
        chosen |= {p for p in flat if len(p) > 1 and p[0] == "layers" and p[1] in wanted}
    if modules:
        for m in _match(model, modules, None):
            chosen |= {p for p in flat if p[:len(m.path)] == m.path}
    if biases:
        chosen |= {p for p in flat if p[-1] == "bias"}
    if head:
        heads = [m for m in model.modules if m.layer is None and m.name.startswith(HEAD_MODULE_PREFIXES)]
        if not heads:
            raise ValueError(f"head=True but this {model.task} model has no head module (modules end with "
                             f"{model.module_names[-2:]}); use task='classification' or head=False")
        for m in heads:
            chosen |= {p for p in flat if p[:len(m.path)] == m.path}
    lora_modules, lora_tree = (), {}
    if lora is not None:
        _check_lora(lora)
        targets = _match(model, lora.targets, lora.layers)
        _check_rank(lora.rank, targets)
        lora_modules = tuple(m.name for m in targets)
        key = jax.random.key(lora.seed)
        index = {m.name: i for i, m in enumerate(model.modules)}
        pdtype = dtype or master_dtype(flat[targets[0].path + ("kernel",)].dtype)
        for m in targets:
            lora_tree[m.name] = _init_lora(jax.random.fold_in(key, index[m.name]), m.d_in, m.d_out, lora, pdtype)
    if not chosen and not lora_tree:
        raise ValueError("nothing is selected for training; pass lora=LoRA(...), layers=, modules=, biases=True "
                         "or head=True")
    chosen_flat = {p: flat[p].astype(master_dtype(flat[p].dtype)) for p in chosen}
    trainable = {"lora": lora_tree, "params": traverse_util.unflatten_dict(chosen_flat)}
    frozen = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in chosen})
    run = _lora_apply(model, lora_tree, lora.scale) if lora_tree else model.apply
    return Adapted(model, trainable, frozen, _groups(model, chosen, lora_modules), lora, lora_modules, run)


def _lora_apply(model: Model, lora_tree: dict, scale: float) -> Callable:
    """``apply(params, input_ids, attention_mask)`` of the model's graph with LoRA factors (shaped as
    ``lora_tree``) in the named dense modules; see `Adapted.params` for its params."""
    module = nnx.merge(model.graphdef, model.params)
    by_name = {node.name: node for _, node in nnx.iter_modules(module) if isinstance(node, Linear)}
    for name, ab in lora_tree.items():
        by_name[name].add_lora(ab["a"], ab["b"], scale)
    return make_apply(nnx.graphdef(module), model.config)


def add_lora(model: Model, *, targets=("query", "key", "value"), layers=None, rank: int = 8, alpha: float = 8,
             init: str = "peft", seed: int = 0, head: bool = False, biases: bool = False) -> Adapted:
    """LoRA (rank, scale alpha/rank) on ``targets`` of ``layers``; optionally also train the head/biases."""
    return adapt(model, lora=LoRA(targets, layers, rank, alpha, init, seed), head=head, biases=biases)


def _init_lora(key, d_in, d_out, lora: LoRA, dtype) -> dict:
    if lora.init == "peft":
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(key, (d_in, lora.rank), jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(key, (d_in, lora.rank), jnp.float32) / np.sqrt(lora.rank)
    return {"a": a.astype(dtype), "b": jnp.zeros((lora.rank, d_out), dtype)}


def _check_lora(lora: LoRA):
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, (int, np.integer)) or lora.rank < 1:
        raise ConfigError(f"LoRA rank={lora.rank!r} must be a positive integer, e.g. 8 (--rank, rank=)")
    if lora.init not in LORA_INITS:
        raise ConfigError(f"LoRA init={lora.init!r} is not one of {LORA_INITS} (--lora-init, init=)")


def _check_rank(rank: int, targets) -> None:
    """A rank above min(d_in, d_out) adds no capacity, only redundant factors: refuse it naming the widths."""
    narrow = [m for m in targets if rank > min(m.d_in, m.d_out)]
    if narrow:
        m, limit = narrow[0], min(min(t.d_in, t.d_out) for t in targets)
        raise ConfigError(f"LoRA rank={rank} exceeds the width of {m.name} (d_in={m.d_in}, d_out={m.d_out}) and of "
                          f"{len(narrow) - 1} other target(s); pass --rank {limit} or less (rank=)")


def _check_layers(model: Model, layers) -> set:
    wanted = {int(i) for i in layers}
    bad = sorted(i for i in wanted if not 0 <= i < model.num_layers)
    if bad:
        raise ConfigError(f"layers {bad} do not exist: this {model.family} model has layers 0..{model.num_layers - 1}"
                          f"; pass --layers with indices in that range (layers=)")
    return wanted


def _match(model: Model, patterns, layers):
    wanted = None if layers is None else _check_layers(model, layers)
    projections = sorted({m.projection for m in model.modules})
    if not patterns:
        raise ConfigError(f"targets={tuple(patterns)} names no module; pass --targets (targets=) with names such as "
                          f"{projections}")
    out = []
    for pattern in patterns:
        hits = [m for m in model.modules if _matches(m.name, pattern)]
        if not hits:
            raise ConfigError(f"target {pattern!r} matches no module of this {model.family} model; projections: "
                              f"{projections}; names look like {model.module_names[0]!r} (--targets, targets=)")
        out += [m for m in hits if m not in out and (wanted is None or m.layer in wanted)]
    if not out:
        raise ConfigError(f"targets {list(patterns)} select no module in layers {sorted(wanted)}; pick layers that "
                          "hold them (--layers, layers=)")
    order = {m.name: i for i, m in enumerate(model.modules)}
    return sorted(out, key=lambda m: order[m.name])


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _groups(model: Model, chosen: set, lora_modules: tuple) -> dict:
    """Group trainable leaves by module: a dense module's own leaves under its name, others by block path."""
    by_path = {m.path: m.name for m in model.modules}
    groups: dict[str, list] = {}
    for name in lora_modules:
        groups.setdefault(name, []).extend([("lora", name, "a"), ("lora", name, "b")])
    for p in sorted(chosen, key=_path_key):
        owner = by_path.get(p[:-1])
        name = owner or ".".join(f"layer{k}" if i == 1 and p[0] == "layers" else str(k)
                                 for i, k in enumerate(p[:-1]) if not (i == 0 and k == "layers"))
        groups.setdefault(name, []).append(("params",) + p)
    order = {m.name: i for i, m in enumerate(model.modules)}
    ordered = sorted(groups, key=lambda n: (order.get(n, len(order)), n))
    return {n: tuple(groups[n]) for n in ordered}


def _path_key(p):
    return tuple((0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in p)


# ---------------------------------------------------------------------------------------------- peft format

def _backbone_name(model: Model, hf_name: str) -> str:
    """``hf_name`` as the bare backbone (``AutoModel``) names it: without the task model's prefix."""
    from .models import family_for

    prefix = next((p for p in family_for(model.config)["backbone_prefixes"] if hf_name.startswith(p)), "")
    return hf_name[len(prefix):]


def save_peft(adapted: Adapted, directory, trainable=None, *, base_model_name_or_path: str | None = None,
              model_class: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format (LoRA, plus the head as
    ``modules_to_save``), so PyTorch peft loads what jaxlin trained. Other selections have no peft form.

    ``model_class``: the transformers class the adapter will be loaded onto, one of `PEFT_MODEL_CLASSES`;
    module names and peft's task_type follow it (``AutoModel``, the bare backbone, names modules
    ``encoder.layer.0.attention.self.query``; the task classes ``bert.encoder.layer.0…``). Default by the
    model's task: "encoder" → AutoModel, "classification" → AutoModelForSequenceClassification, "causal_lm" →
    AutoModelForCausalLM."""
    from safetensors.numpy import save_file

    trainable = adapted.trainable if trainable is None else trainable
    model, lora = adapted.model, adapted.lora
    model_class = _TASK_MODEL_CLASS[model.task] if model_class is None else model_class
    if model_class not in PEFT_MODEL_CLASSES:
        raise ValueError(f"model_class={model_class!r} is not one of {list(PEFT_MODEL_CLASSES)}")
    bare = model_class == "AutoModel"
    peft_name = (lambda hf: _backbone_name(model, hf)) if bare else (lambda hf: hf)
    heads = [m for m in model.modules if m.layer is None and m.name.startswith(HEAD_MODULE_PREFIXES)]
    head_paths = {("params",) + m.path + (leaf,) for m in heads for leaf in ("kernel", "bias")}
    flat = traverse_util.flatten_dict({"params": trainable.get("params", {})})
    other = sorted(set(flat) - head_paths)
    if other:
        raise ValueError(f"peft's format holds LoRA adapters and whole heads only; these trainable leaves have no "
                         f"peft form: {other[:4]}. Use jaxlin's own save (np.savez of the trainable tree) instead")
    if lora is None and not flat:
        raise ValueError("nothing to export: the adapted model has no LoRA modules and no trained head")
    if bare and flat:
        raise ValueError("model_class='AutoModel' is the bare backbone, which has no head for the trained head; "
                         "use model_class='AutoModelForSequenceClassification'")
    tensors, targets = {}, []
    for name, ab in trainable.get("lora", {}).items():
        hf = peft_name(model.module(name).hf_name)
        targets.append(hf)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[f"base_model.model.{hf}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    saved_heads = sorted({m.hf_name.split(".")[0] for m in heads if ("params",) + m.path + ("kernel",) in flat})
    for m in heads:
        if ("params",) + m.path + ("kernel",) not in flat:
            continue
        kernel = np.asarray(flat[("params",) + m.path + ("kernel",)], np.float32)
        tensors[f"base_model.model.{m.hf_name}.weight"] = np.ascontiguousarray(kernel.T)
        if ("params",) + m.path + ("bias",) in flat:
            tensors[f"base_model.model.{m.hf_name}.bias"] = np.asarray(flat[("params",) + m.path + ("bias",)],
                                                                        np.float32)
    # SEQ_CLS makes peft expect the head's weights (it adds the head to modules_to_save): only with a saved head
    task_type = PEFT_MODEL_CLASSES[model_class] if model_class != "AutoModelForSequenceClassification" or \
        saved_heads else None
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": lora.rank if lora else 8,
        "lora_alpha": lora.alpha if lora else 8, "use_rslora": bool(lora and lora.use_rslora),
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": model.family == "gpt2", "modules_to_save": saved_heads or None,
        "base_model_name_or_path": base_model_name_or_path or model.source, "inference_mode": True,
        "init_lora_weights": True,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def load_peft(model: Model, directory) -> Adapted:
    """Read a peft LoRA adapter directory (as written by peft or ``save_peft``, with the bare backbone's module
    names or a task class's) onto ``model``."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except FileNotFoundError as e:
        raise ValueError(f"{directory} is not a peft adapter directory ({e.filename} is missing)") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r} in {directory}; only LORA adapters are read")
    by_hf = {**{_backbone_name(model, m.hf_name): m for m in model.modules}, **{m.hf_name: m for m in model.modules}}
    names, a_b = [], {}
    for key, value in tensors.items():
        stem = key.removeprefix("base_model.model.")
        for part, leaf in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if stem.endswith(part):
                hf = stem[: -len(part)].replace(".default", "")
                if hf not in by_hf:
                    raise ValueError(f"adapter tensor {key!r} targets {hf!r}, which this model does not have")
                a_b.setdefault(by_hf[hf].name, {})[leaf] = jnp.asarray(value.T)
    names = [m.name for m in model.modules if m.name in a_b]
    lora = LoRA(tuple(names), None, int(config["r"]), float(config["lora_alpha"]),
                use_rslora=bool(config.get("use_rslora", False)))
    adapted = adapt(model, lora=lora, head=bool(config.get("modules_to_save")))
    trainable = {"lora": {n: a_b[n] for n in names}, "params": adapted.trainable["params"]}
    if config.get("modules_to_save"):
        flat = traverse_util.flatten_dict(trainable["params"])
        for m in model.modules:
            w = tensors.get(f"base_model.model.{m.hf_name}.weight")
            if w is not None and m.path + ("kernel",) in flat:
                flat[m.path + ("kernel",)] = jnp.asarray(w.T)
                if m.has_bias:
                    flat[m.path + ("bias",)] = jnp.asarray(tensors[f"base_model.model.{m.hf_name}.bias"])
        trainable["params"] = traverse_util.unflatten_dict(flat)
    return dataclasses.replace(adapted, trainable=trainable)


__all__ = ["LoRA", "Adapted", "AdaptedFunction", "adapt", "add_lora", "save_peft", "load_peft", "PEFT_MODEL_CLASSES"]
