#!/usr/bin/env bash
# Everything a short, scarce GPU session should verify, in one run: on a machine with an NVIDIA GPU,
# install refqwen (and any wheels carried in .whl/), run the GPU tests (tests/test_gpu.py, and the
# property suite of tests/test_backends.py, which then includes the cupy backends' real kernels),
# then the benchmark (tools/gpu_bench.py). Results go to $OUT (default: ./gpu-results):
#   device.txt   nvidia-smi and the CuPy version      tests.log    the pytest run
#   bench.txt    the benchmark's table                 bench.json   the same, as JSON
#   summary.txt  the exit status of each step
# Usage: bash tools/gpu_check.sh [--quick]   (--quick: the 0.5B shape only, fewer tokens)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{ nvidia-smi; "$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"; } \
    >"$OUT/device.txt" 2>&1

# Install without the network where there is none: carried wheels, then refqwen itself with no dependencies
# (a GPU image has numpy, cupy, numba, safetensors, tokenizers, jinja2, tqdm, pytest, hypothesis, torch).
if ls .whl/*.whl >/dev/null 2>&1; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl; fi
"$PY" -c "import refqwen.backends.cupy_gpu" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || "$PY" -m pip install -q -e ".[gpu,test]"

"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_cupy_host.py tests/test_backends.py \
    2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

if [ "${1:-}" = "--quick" ]; then
    bench=(--models demo-shape --prompt-tokens 256 --decode-tokens 32)
else
    bench=(--models demo-shape,7b --backends cupy,cupy-int8-channel,cupy-f16,cupy-bf16)
fi
"$PY" tools/gpu_bench.py "${bench[@]}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

# Every Qwen2 size in int8 on one GPU: the two largest, built on the device (short runs)
large_rc=0
if [ "${1:-}" != "--quick" ]; then
    "$PY" tools/gpu_bench.py --models 57b-a14b,72b --backends cupy --prompt-tokens 128 --decode-tokens 16 \
        --json "$OUT/bench-large.json" 2>&1 | tee "$OUT/bench-large.txt"
    large_rc=${PIPESTATUS[0]}
fi

echo "tests rc=$tests_rc bench rc=$bench_rc large rc=$large_rc" | tee "$OUT/summary.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
