"""jaxlin: linearized fine-tuning, empirical NTKs and their spectra for real checkpoints, in JAX.

Stages (each a module; data between them are plain pytrees and arrays):
models → adapters → linearize / ntk / module_ntk → spectrum / select / solve → train / sweep → probe → report.
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
from .readout import label_word_readout

# spectra, layer choice, solvers
from .spectrum import condition_numbers, sign_kernel_stats, spectrum_stats
from .select import (baseline_selections, configuration_kernel, configuration_stats, enumerate_configurations,
                     greedy_select, perturbation_report)
from .solve import (conjugate_gradient, flow_dynamics, gd_dynamics, kernel_predict, kernel_ridge, ridge_path)
from .regularizers import adamspd, prox_l2, selective_prox
from .stats import correlation
from .probe import linearity_probe, probe_adapted

__all__ = [
    "__version__",
    "BackendCheck", "BackendError", "check_backend", "require_healthy_backend",
    "CheckpointError", "Model", "load_pretrained",
    "Adapted", "AdaptedFunction", "LoRA", "adapt", "add_lora", "load_peft", "save_peft",
    "AssetNotFoundError", "DataError", "TextDataset", "batches", "calibration_subset", "encode", "load_dataset",
    "train_eval_split",
    "linearize", "linearize_at", "empirical_ntk", "empirical_ntk_fn", "estimate_memory", "ShardingSpec",
    "blocked_gram", "module_ntks", "label_word_readout",
    "condition_numbers", "sign_kernel_stats", "spectrum_stats",
    "baseline_selections", "configuration_kernel", "configuration_stats", "enumerate_configurations",
    "greedy_select", "perturbation_report",
    "conjugate_gradient", "flow_dynamics", "gd_dynamics", "kernel_predict", "kernel_ridge", "ridge_path",
    "adamspd", "prox_l2", "selective_prox", "correlation", "linearity_probe", "probe_adapted",
]
