"""Will a run fit? Per-device bytes of a `RunConfig` on its mesh, from shapes alone (``jaxlin plan``).

    plan = memory_plan(preset("quick"))          # or memory_plan(config, mesh=parse_mesh("data=2,model=4"))
    plan.fits, plan.message, plan.items["parameters"]
    print(plan.table())

Nothing is loaded but the checkpoint's config (a .gguf file's metadata) and, when the number of classes is not in
the config, the data set; nothing is compiled: the model is built under `flax.nnx.eval_shape`, adapted and given
its optimiser state under `jax.eval_shape`. Per device, on the mesh the run would use (one device without one):

- ``parameters`` (exact): every weight of the checkpoint with the `NamedSharding` `jaxlin.load_pretrained`
  gives it (`jaxlin.sharding.param_shardings`): Σ prod(shard shape)·itemsize, as `sharding.bytes_per_device`;
  with ``model.dtype = "bfloat16"`` the base weights take 2 bytes, the head 4 (docs/scaling.md, "Mixed precision").
- ``trainable`` (exact): the LoRA factors (and the head with ``model.train_head``) of the λ sweep, sharded by
  `sharding.adapted_shardings`.
- ``optimizer`` (exact): the sweep's optimiser state (`jaxlin.train.make_optimizer` of
  `RunConfig.sweep_train_config` with the run's regulariser: Adam's two moments, a prox anchor θ0, counters),
  sharded as `jaxlin.train_mesh.MeshPlan` places it; 0 when no stage trains (dynamics, sweep, study).
- ``activations`` (estimate) of one block of b = ⌈B / data⌉ examples per device, B = ``kernel.block_size``
  (default ``data.num_calibration``) capped by the rows of the largest kernel (``data.num_calibration``, and
  ``kernel.num_krr`` with the krr stage); ``train.batch_size`` when larger and a stage trains; L =
  ``data.max_length`` tokens, through n layers of width D, MLP width F and H heads, with C classes, in
  ``model.dtype`` (4 bytes, 2 in bfloat16): the structured kernel's forward pass kept for its pullbacks,
  n·b·L·(10·D + 2·F + 2·H·L), one layer's working set for the pullback of one output at a time,
  b·L·(10·D + 2·F + 2·H·L), a causal LM's vocabulary logits b·L·V with the label-word readout, and the inputs and
  output cotangents of every adapted module, Σ_m b·L·(d_in + C·d_out), these two in float32 whatever the dtype.
- ``kernel`` (estimate), with the kernel's own B and b = ⌈B / data⌉: one Gram tile, modules·b·B·C²·4 bytes,
  and the LoRA Jacobian features of the two row blocks it contracts, Σ_m C·R·(d_in + d_out)·(b + B)·4
  (R = ``lora.rank``). Rows kept for later tiles are capped by the row cache (`jaxlin.gram.blocked_gram`'s
  ``cache_bytes``: a quarter of the device) and left out.

The verdict compares the sum of the five with the device's memory: ``bytes_limit`` of `Device.memory_stats`
where the backend reports it (GPU, TPU), else the host's RAM shared by the run's devices on it (CPU). The sum is an
upper bound of what one stage holds at once (no stage trains and builds kernels together), and the estimates
leave out XLA's temporaries, so a plan that fits by a thin margin may still not. docs/scaling.md, "Will it
fit? `jaxlin plan`".
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from . import models, sharding
from .config import ConfigError, RunConfig
from .models import checkpoint
from .train_mesh import MeshPlan

ITEMS = ("parameters", "trainable", "optimizer", "activations", "kernel")
ESTIMATED = ("activations", "kernel")
LABELS = {"parameters": "parameters", "trainable": "trainable (LoRA{head})", "optimizer": "optimizer state ({opt})",
          "activations": "activations of one block", "kernel": "kernel tile + 2 row blocks"}
TRAINING_STAGES = ("dynamics", "sweep", "study")
COMPUTE_ITEMSIZE = 4  # float32: logits, the kernels' factors and tiles (activations: `model.dtype`'s itemsize)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of a run (``items``, keyed by `ITEMS`; `ESTIMATED` ones are estimates), the device memory
    they are compared with and where it came from, the mesh, and the verdict: ``fits`` and a one-line ``message``
    (on refusal it names the largest item and the flags that shrink it)."""

    items: dict[str, int]
    device_bytes: int
    device_source: str  # "bytes_limit of cuda:0", "host RAM / 8 CPU device(s)", "given"
    mesh: dict[str, int]
    model: str
    optimizer: str  # the optimiser whose state ``items["optimizer"]`` holds ("none" without a training stage)
    head: bool  # whether the head trains with the LoRA factors
    fits: bool
    message: str

    @property
    def total_bytes(self) -> int:
        return sum(self.items.values())

    def table(self) -> str:
        """The plan as a small table: item, per-device MiB, exact or estimate; then the device and the verdict."""
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"jaxlin plan: {self.model} on mesh {mesh}, per device:"]
        for item in ITEMS:
            label = LABELS[item].format(head=" + head" if self.head else "", opt=self.optimizer)
            kind = "estimate" if item in ESTIMATED else "exact"
            lines.append(f"  {label:32s} {_mib(self.items[item]):>12s}  {kind}")
        lines.append(f"  {'total':32s} {_mib(self.total_bytes):>12s}")
        lines.append(f"  {'device memory':32s} {_mib(self.device_bytes):>12s}  {self.device_source}")
        lines.append(("fits: " if self.fits else "does not fit: ") + self.message)
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def memory_plan(config: RunConfig, *, mesh: Mesh | None = None, num_classes: int | None = None,
                memory_bytes: int | None = None) -> Plan:
    """The `Plan` of ``config`` (module docstring): on ``mesh`` (default: ``config.mesh.shape`` over every device,
    or one device without it), for ``num_classes`` outputs (default: ``model.label_words``, ``data.label_names``
    or the data set's classes), against ``memory_bytes`` per device (default: the device's, `device_memory`).
    Raises ConfigError (one line) when the checkpoint or its adaptation is invalid; a plan that does not fit is
    a Plan with ``fits=False``, not an error (`check_plan` turns it into one)."""
    if mesh is None:
        mesh = _config_mesh(config)
    if num_classes is None:
        num_classes = _num_classes(config)
    model = abstract_model(config, num_classes)
    adapted, adapted_lora = _abstract_adapted(model, config)
    trainable_s, _ = sharding.adapted_shardings(adapted, mesh)
    items = {"parameters": sharding.bytes_per_device(model, mesh),
             "trainable": _shard_bytes(adapted.trainable, trainable_s)}
    trains = any(s in config.stages for s in TRAINING_STAGES)
    items["optimizer"] = _optimizer_bytes(config, adapted.trainable, trainable_s, mesh) if trains else 0
    data = mesh.shape.get("data", 1)
    b = -(-_tile_rows(config) // data)
    b_act = max(b, -(-config.train.batch_size // data)) if trains else b
    items["activations"] = _activation_bytes(config, model, adapted_lora, b_act, num_classes)
    items["kernel"] = _kernel_bytes(config, model, adapted_lora, b, num_classes)
    if memory_bytes is None:
        own = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        memory_bytes, source = device_memory(own[0], sharing=len(own))
    else:
        source = "given"
    fits = sum(items.values()) <= memory_bytes
    head = bool(adapted.trainable.get("params"))
    plan = Plan(items, int(memory_bytes), source, dict(mesh.shape), config.model.name,
                _optimizer_name(config) if trains else "none", head, fits, "")
    return dataclasses.replace(plan, message=_message(plan, config))


def check_plan(config: RunConfig, mesh: Mesh | None = None) -> Plan:
    """`memory_plan` of the run; raises its one-line message as a ConfigError when it does not fit."""
    plan = memory_plan(config, mesh=mesh)
    if not plan.fits:
        raise ConfigError(plan.message)
    return plan


def device_memory(device, sharing: int = 1) -> tuple[int, str]:
    """(bytes, where they come from) of one ``device``: ``memory_stats()["bytes_limit"]`` where the backend reports
    it (GPU, TPU), else the host's physical RAM divided by ``sharing``, the devices of this process the run uses
    (simulated CPU devices share it; a run without a mesh uses one)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"bytes_limit of {device}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // sharing, f"host RAM / {sharing} {device.platform.upper()} device(s)"


# ------------------------------------------------------------------------------------------------- shapes

def _config_mesh(config: RunConfig) -> Mesh:
    """The run's mesh (`jaxlin.distributed.parse_mesh` of ``mesh.shape``), or a 1×1 mesh of the first device."""
    from .distributed import MESH_AXES, parse_mesh

    if config.mesh.shape is None:
        return jax.make_mesh((1, 1), MESH_AXES, devices=jax.devices()[:1])
    try:
        return parse_mesh(config.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"{e}; fix --mesh") from None


def _num_classes(config: RunConfig) -> int:
    words, names = config.model.label_words, config.data.label_names
    if config.model.readout == "label_words" and words is not None:
        return len(words)
    if names is not None:
        return len(names)
    from .pipeline import load_data  # the data set is read only when its classes are not in the config

    return load_data(config).num_classes


def abstract_model(config: RunConfig, num_classes: int) -> models.Model:
    """The run's `jaxlin.models.Model` with `jax.ShapeDtypeStruct` parameters: the checkpoint's config (or a GGUF
    file's metadata) built under `flax.nnx.eval_shape`, as `jaxlin.load_pretrained` builds it before filling it."""
    m = config.model
    # a clear CheckpointError for a missing checkpoint, an unknown family or a broken config
    hf_config = models.read_hf_config(checkpoint.resolve(m.name))
    fam = models.family_for(hf_config)
    # label words on an encoder are refused by the run itself (`jaxlin.pipeline`); planned here with its head
    label_words = m.readout == "label_words" and fam["kind"] == "decoder"
    task = "causal_lm" if label_words else "classification"
    head = m.head if fam["kind"] == "encoder" and not label_words else None
    abstract = nnx.eval_shape(lambda: models.build_model(hf_config, task=task, num_labels=None if label_words
                                                         else num_classes, seed=m.seed, head=head, dtype=m.dtype))
    return models.from_nnx(abstract, config=hf_config, family=fam["name"], task=task, source=m.name)


def _abstract_adapted(model: models.Model, config: RunConfig):
    """The run's (adapted, adapted_lora) (`jaxlin.pipeline`'s ``run_adapters``) with ShapeDtypeStruct leaves."""
    from .pipeline import run_adapters

    built = {}

    def shapes(params):
        built["pair"] = run_adapters(dataclasses.replace(model, params=params), config)
        return [(a.trainable, a.frozen) for a in built["pair"]]

    leaves = jax.eval_shape(shapes, model.params)
    return tuple(dataclasses.replace(a, model=model, trainable=t, frozen=f)
                 for a, (t, f) in zip(built["pair"], leaves))


def _shard_bytes(tree, shardings) -> int:
    """Σ over leaves of prod(shard shape)·itemsize: what each device holds of ``tree`` on ``shardings``."""
    return int(sum(math.prod(s.shard_shape(tuple(v.shape))) * np.dtype(v.dtype).itemsize
                   for v, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def _optimizer_name(config: RunConfig) -> str:
    return "adamspd" if config.train.regularizer == "adamspd" else config.sweep_train_config(8).optimizer


def _optimizer_bytes(config: RunConfig, trainable, trainable_s, mesh: Mesh) -> int:
    """The λ sweep's optimiser state (the largest of the run's: the dynamics stage's SGD keeps at most an anchor),
    each leaf sharded as `MeshPlan.opt_state_shardings` places it."""
    from .train import make_optimizer

    t = config.train
    tc = dataclasses.replace(config.sweep_train_config(8), regularizer=t.regularizer, strength=max(t.lambdas))
    state = jax.eval_shape(make_optimizer(tc, tc.steps).init, trainable)
    return _shard_bytes(state, MeshPlan(mesh).opt_state_shardings(state, trainable, trainable_s))


def _tile_rows(config: RunConfig) -> int:
    """B: rows of the largest kernel tile, the block size capped by the rows a kernel has (`jaxlin.gram`)."""
    rows = max(config.data.num_calibration, config.kernel.num_krr if "krr" in config.stages else 0)
    return min(config.kernel_block_size(), rows)


def _widths(hf_config) -> tuple[int, int, int, int]:
    """(layers n, width D, MLP width F, heads H) of a transformers config (GPT-2's n_inner None is 4·D)."""
    d = hf_config.hidden_size
    f = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * d
    return hf_config.num_hidden_layers, d, f, hf_config.num_attention_heads


def _lora_shapes(model: models.Model, adapted_lora) -> list[tuple[int, int]]:
    return [(model.module(n).d_in, model.module(n).d_out) for n in adapted_lora.lora_modules]


def _activation_bytes(config: RunConfig, model: models.Model, adapted_lora, b: int, c: int) -> int:
    n, d, f, h = _widths(model.config)
    length = config.data.max_length
    per_layer = b * length * (10 * d + 2 * f + 2 * h * length)
    logits = b * length * model.config.vocab_size if model.task == "causal_lm" else 0
    taps = sum(b * length * (d_in + c * d_out) for d_in, d_out in _lora_shapes(model, adapted_lora))
    return (n + 1) * per_layer * jnp.dtype(config.model.dtype).itemsize + (logits + taps) * COMPUTE_ITEMSIZE


def _kernel_bytes(config: RunConfig, model: models.Model, adapted_lora, b: int, c: int) -> int:
    shapes = _lora_shapes(model, adapted_lora)
    big_b = _tile_rows(config)
    tile = len(shapes) * b * big_b * c * c
    rows = sum(c * config.lora.rank * (d_in + d_out) * (b + big_b) for d_in, d_out in shapes)
    return (tile + rows) * COMPUTE_ITEMSIZE


# ------------------------------------------------------------------------------------------------ verdict

def _message(plan: Plan, config: RunConfig) -> str:
    """One line: the total against the device, and on refusal the largest item and the flags that shrink it."""
    data, model_axis = plan.mesh.get("data", 1), plan.mesh.get("model", 1)
    have = f"the device has {_gib(plan.device_bytes)} ({plan.device_source})"
    if plan.fits:
        return f"the run needs {_gib(plan.total_bytes)} per device and {have}"
    largest = max(ITEMS, key=plan.items.get)
    block = f"--block-size (now {config.kernel_block_size()})"
    knobs = {"parameters": f"use a larger --mesh model axis (now {model_axis}) or a smaller --model",
             "trainable": f"lower --rank (now {config.lora.rank}), adapt fewer --targets or --layers, or use a "
                          f"larger --mesh model axis (now {model_axis})",
             "activations": f"lower {block} or --max-length (now {config.data.max_length}), or use a larger "
                            f"--mesh data axis (now {data})",
             "kernel": f"lower {block}, or use a larger --mesh data axis (now {data})"}
    knobs["optimizer"] = knobs["trainable"]
    label = LABELS[largest].format(head=" + head" if plan.head else "", opt=plan.optimizer)
    kind = ", an estimate" if largest in ESTIMATED else ""
    return (f"plan: the run needs {_gib(plan.total_bytes)} per device, the largest part the {label} "
            f"({_gib(plan.items[largest])}{kind}), but {have}; {knobs[largest]}")


__all__ = ["Plan", "memory_plan", "check_plan", "device_memory", "abstract_model", "ITEMS", "ESTIMATED"]
