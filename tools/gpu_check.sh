#!/usr/bin/env bash
# The one-shot GPU check of lowmoe's CUDA kernels (issue 6) and GPU expert cache (issue 7), meant
# to finish in under 10 minutes (under 6 with --skip-bench):
#
#     tools/gpu_check.sh OUTDIR [--skip-bench]
#
# kernels against NumPy float64, GPU vs CPU greedy tokens (bundled model and transformers-made
# checkpoints), the GPU expert cache and CPU-MoE vs the resident GPU run, kernel launches and host
# syncs per decoded token, decode GEMV bandwidth vs a device-to-device copy, and the expert cache
# benchmark (tools/gpu_bench.py: reactive vs nextgate vs oracle under a 12 GiB emulation at 8K
# context, misses on the CPU, CPU-MoE vs GPU cache, then `lowmoe bench --device cuda` at the same
# budget); see tools/gpu_check.py.
# Prints a short table last; full logs in OUTDIR (gpu_check.log, summary.json, gpu_bench.json,
# setup.log, nvidia-smi.txt).
#
# Nothing is installed and nothing is downloaded: the GPU machine reaches no network. lowmoe runs
# from this source tree (PYTHONPATH) on an interpreter that already has its dependencies (numpy,
# numba, safetensors, tokenizers, rich) and CuPy; torch and transformers make the test checkpoints
# when they import, else those checks are skipped (and reported failed).
# Exit status: 0 all passed, 1 something failed (the interpreter lacking a dependency included),
# 2 no usable GPU (no CuPy, or CuPy finds no GPU it can use), said in one line before anything slow.
#
#   LOWMOE_PYTHON=PY        the interpreter (default python3)
#   LOWMOE_TEST_MODELS=DIR  checkpoints already made by tools/make_test_models.py; default: made into
#                           OUTDIR/models when torch and transformers import
set -euo pipefail
out=${1:?usage: tools/gpu_check.sh OUTDIR [--skip-bench]}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # before the cd below: OUTDIR is relative to the caller's directory
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${LOWMOE_PYTHON:-python3}
log="$out/setup.log"
: > "$log"

if ! command -v "$py" > /dev/null; then
    echo "gpu_check: no interpreter '$py' (set LOWMOE_PYTHON)"
    exit 1
fi
# What lowmoe imports (setup.cfg's install_requires), each tried alone so that every missing one
# is named; CuPy is left to gpu_check.py, which tells "no usable GPU" (status 2) from a failure.
missing=$("$py" - 2>> "$log" <<'EOF' || echo "a working Python (see setup.log)"
import importlib, sys
missing = [] if sys.version_info >= (3, 10) else [f"Python >= 3.10 (this is {sys.version.split()[0]})"]
for name in ("numpy", "numba", "safetensors", "tokenizers", "rich"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
print("; ".join(missing))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: $(command -v "$py") lacks what lowmoe needs: $missing"
    exit 1
fi

if ! nvidia-smi > "$out/nvidia-smi.txt" 2>&1; then  # a hint when the probe below fails
    command -v nvidia-smi > /dev/null || echo "not on PATH" > "$out/nvidia-smi.txt"
    echo "gpu_check: nvidia-smi failed: $(head -1 "$out/nvidia-smi.txt")"
fi
status=0
"$py" tools/gpu_check.py "$out" --probe || status=$?
[ "$status" = 0 ] || exit "$status"

models=${LOWMOE_TEST_MODELS:-}
if [ -z "$models" ]; then
    if "$py" -c "import torch, transformers" 2>> "$log"; then
        models="$out/models"
        echo "gpu_check: making the test checkpoints in $models"
        if ! "$py" tools/make_test_models.py "$models" >> "$log" 2>&1; then
            echo "gpu_check: tools/make_test_models.py failed (see $log)"
            models=""
        fi
    else
        echo "gpu_check: torch or transformers does not import (see $log); the transformers-made models are skipped"
    fi
fi

exec "$py" tools/gpu_check.py "$out" ${models:+--models "$models"} "${@:2}"
