"""jaxlin: linearized fine-tuning, empirical NTKs and their spectra for real checkpoints, in JAX."""
__version__ = "0.1.0"
