"""jaxlin: linearized fine-tuning, empirical NTKs and their spectra for real checkpoints, in JAX.

Stages (each a module; data between them are plain pytrees and arrays):
models → adapters → linearize / ntk / module_ntk → spectrum / select / solve → train / sweep → probe → study
→ report; `run` wires them together (the `jaxlin run` command).

The public API is the names below (`__all__`); everything else, and every name with a leading underscore, is
internal and may change. `run` is imported on first use (PEP 562 `__getattr__`): the pipeline pulls in the
report and matplotlib, which `import jaxlin` should not pay for.
"""
__version__ = "0.1.0"

# is the backend computing what jaxlin relies on?
from .backend import BackendCheck, BackendError, check_backend, require_healthy_backend

# models and what is fine-tuned
from .models import CheckpointError, Model, load_pretrained
from .adapters import Adapted, AdaptedFunction, LoRA, adapt, add_lora, load_peft, save_peft
from .assets import AssetNotFoundError
from .data import DataError, TextDataset, batches, calibration_subset, encode, load_dataset, train_eval_split

# linearization and kernels
from .linearize import linearize, linearize_at
from .ntk import empirical_ntk, empirical_ntk_fn, estimate_memory
from .gram import ShardingSpec, blocked_gram
from .module_ntk import module_ntks
from .readout import check_readout, label_word_readout, zero_shot_accuracy

# spectra, layer choice, solvers
from .spectrum import condition_numbers, kernel_statistics, sign_kernel_stats, spectrum_stats
from .select import (baseline_selections, configuration_kernel, configuration_stats, enumerate_configurations,
                     greedy_select, perturbation_report, spectral_selection)
from .solve import (conjugate_gradient, flow_dynamics, gd_dynamics, kernel_predict, kernel_ridge, ridge_path)
from .primal import primal_ridge
from .regularizers import adamspd, prox_l2, selective_prox
from .stats import correlation, macro_f1, modal_tie_fraction
from .probe import linearity_probe, probe_adapted

# training, λ sweeps, the κ–performance study and the configured run
from .train import TrainConfig, evaluate, fit, model_functions
from .prefix import FrozenPrefix, frozen_prefix
from .sweep import ClassificationObjective, lambda_sweep, sweep_summary
from .next_token import NextTokenObjective, completions_from_labels, load_completions, next_token_functions, \
    next_token_loss
from .study import StudyConfig, run_study, study_preset
from .config import ConfigError, RunConfig, load_config, preset

# several devices and processes
from . import distributed, sharding
from .train_mesh import MeshPlan
from .plan import Plan, memory_plan

_LAZY = {"run": ("pipeline", "run")}  # name → (module, attribute), imported on first access


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'jaxlin' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "BackendCheck", "BackendError", "check_backend", "require_healthy_backend",
    "CheckpointError", "Model", "load_pretrained",
    "Adapted", "AdaptedFunction", "LoRA", "adapt", "add_lora", "load_peft", "save_peft",
    "AssetNotFoundError", "DataError", "TextDataset", "batches", "calibration_subset", "encode", "load_dataset",
    "train_eval_split",
    "linearize", "linearize_at", "empirical_ntk", "empirical_ntk_fn", "estimate_memory", "ShardingSpec",
    "blocked_gram", "module_ntks", "label_word_readout", "check_readout", "zero_shot_accuracy",
    "condition_numbers", "kernel_statistics", "sign_kernel_stats", "spectrum_stats",
    "baseline_selections", "configuration_kernel", "configuration_stats", "enumerate_configurations",
    "greedy_select", "perturbation_report", "spectral_selection",
    "conjugate_gradient", "flow_dynamics", "gd_dynamics", "kernel_predict", "kernel_ridge", "ridge_path",
    "primal_ridge", "adamspd", "prox_l2", "selective_prox", "correlation", "macro_f1", "modal_tie_fraction", "linearity_probe",
    "probe_adapted",
    "TrainConfig", "evaluate", "fit", "model_functions", "FrozenPrefix", "frozen_prefix", "lambda_sweep",
    "sweep_summary", "ClassificationObjective",
    "NextTokenObjective", "completions_from_labels", "load_completions", "next_token_functions", "next_token_loss",
    "StudyConfig", "run_study", "study_preset", "ConfigError", "RunConfig", "load_config", "preset", "run",
    "distributed", "sharding", "MeshPlan", "Plan", "memory_plan",
]
