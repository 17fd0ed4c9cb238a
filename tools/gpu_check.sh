#!/usr/bin/env bash
# The one-shot GPU check of lowmoe's CUDA kernels (issue 6) and GPU expert cache (issue 7), meant
# to finish in under 10 minutes (under 6 with --skip-bench):
#
#     tools/gpu_check.sh OUTDIR [--skip-bench]
#
# kernels against NumPy float64, GPU vs CPU greedy tokens (bundled model and transformers-made
# checkpoints), the GPU expert cache and CPU-MoE vs the resident GPU run, decode GEMV bandwidth vs a
# device-to-device copy, and the expert cache benchmark (tools/gpu_bench.py: reactive vs nextgate vs
# oracle under a 12 GiB emulation at 8K context, misses on the CPU, CPU-MoE vs GPU cache, then
# `lowmoe bench --device cuda` at the same budget); see tools/gpu_check.py.
# Prints a short table last; full logs in OUTDIR (gpu_check.log, summary.json, gpu_bench.json,
# setup.log, nvidia-smi.txt).
# Exit status: 0 all passed, 1 something failed, 2 no usable GPU.
#
#   LOWMOE_GPU_VENV=DIR     virtual environment to use (default .venv-gpu); created when missing, and
#                           lowmoe with its CuPy extra installed into it when `import cupy, lowmoe` fails
#   LOWMOE_TEST_MODELS=DIR  checkpoints already made by tools/make_test_models.py; default: made into
#                           OUTDIR/models, which needs torch and transformers (installed when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
venv=${LOWMOE_GPU_VENV:-.venv-gpu}
log="$out/setup.log"
: > "$log"

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "gpu_check: nvidia-smi failed (see $out/nvidia-smi.txt)"
# The CuPy build must suit the driver: a CUDA 12 driver takes cupy-cuda12x, newer ones cupy-cuda13x.
cuda_major=$(sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' "$out/nvidia-smi.txt" | head -1)
extra=cuda13
if [ "${cuda_major:-13}" = 12 ]; then extra=cuda12; fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >> "$log" 2>&1
py="$venv/bin/python"
if ! "$py" -c "import cupy, lowmoe" 2>> "$log"; then
    echo "gpu_check: installing lowmoe[$extra] into $venv (log: $log)"
    "$py" -m pip install -q -e ".[$extra]" >> "$log" 2>&1
fi

models=${LOWMOE_TEST_MODELS:-}
if [ -z "$models" ]; then
    models="$out/models"
    if ! "$py" -c "import torch, transformers" 2>> "$log"; then
        echo "gpu_check: installing torch and transformers for tools/make_test_models.py (log: $log)"
        timeout 240 "$py" -m pip install -q torch==2.13.0 'transformers>=4.51' >> "$log" 2>&1 \
            || echo "gpu_check: could not install torch and transformers; the transformers-made models are skipped"
    fi
    echo "gpu_check: making the test checkpoints in $models"
    if ! "$py" tools/make_test_models.py "$models" >> "$log" 2>&1; then
        echo "gpu_check: tools/make_test_models.py failed (see $log)"
        models=""
    fi
fi

exec "$py" tools/gpu_check.py "$out" ${models:+--models "$models"} "${@:2}"
