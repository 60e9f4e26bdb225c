#!/usr/bin/env bash
# jaxlin benchmarks on one GPU, offline: jax (CUDA), flax, optax, numpy and jaxlin from this checkout only.
# No network, no transformers: the models are RoBERTa-base dimensions with random weights. neural-tangents
# (the NT cases) comes from wheels carried in benchmarks/wheels/ when the machine lacks it; put them there
# untracked before the run:  pip download neural-tangents==0.6.5 frozendict --no-deps -d benchmarks/wheels
#
#   bash benchmarks/gpu_suite.sh            # from the repository root; ~8 minutes on one H100
#   SIZE=smoke bash benchmarks/gpu_suite.sh # the same path at toy size (also the CPU check: < 3 min)
#
# Writes benchmarks/results/<device>-<size>-<date>.json (+ .md tables) and, when $OUT is set (the device
# runner's output folder), copies both there.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${SIZE:-gpu}"
BUDGET_S="${BUDGET_S:-420}"          # cases that would start after this are recorded as skipped
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
# jaxlin.gram imports tqdm for a progress bar; without it, use a no-op stand-in (benchmarks/_shims).
if ! "$PY" -c "import tqdm.auto" 2>/dev/null; then
  echo "tqdm not installed: using benchmarks/_shims/tqdm (no-op progress bar)"
  export PYTHONPATH="$PWD/benchmarks/_shims:$PYTHONPATH"
fi
if ! "$PY" -c "import neural_tangents" 2>/dev/null && compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index --target /tmp/jaxlin-bench-site benchmarks/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/jaxlin-bench-site"
  echo "neural-tangents from benchmarks/wheels (installed to /tmp/jaxlin-bench-site)"
fi
"$PY" - <<'PYEOF'
import sys, jax
sys.modules["transformers"] = None  # prove the suite's imports do not need transformers
print("jax", jax.__version__, "devices", jax.devices())
import jaxlin, jaxlin.models  # must import without transformers
print("jaxlin", jaxlin.__version__, "imports OK")
PYEOF
dev="$("$PY" -c "from benchmarks._harness import device_tag; print(device_tag())")"
stamp="$(date +%Y-%m-%d-%H%M%S)"
json="benchmarks/results/${dev}-${SIZE}-${stamp}.json"
md="benchmarks/results/${dev}-${SIZE}-${stamp}.md"
"$PY" benchmarks/run_all.py --size "$SIZE" --budget-s "$BUDGET_S" --out "$json" --markdown "$md"
if [ -n "${OUT:-}" ]; then cp "$json" "$md" "$OUT"/; fi
echo "results: $json $md"
