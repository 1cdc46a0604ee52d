#!/usr/bin/env bash
# One call on the GPU machine (docs/PERFORMANCE.md, "CUDA runtime"): install the carried wheels, map the
# package the way setuptools' package-dir does, then run the CUDA tests and/or the benchmark, logs under $OUT.
#   benchmarks/device_check.sh tests|bench|all|profile|kernels   (kernels: the kernel tests, then bench_kernels.py)
set -o pipefail
if [ -z "${OUT:-}" ]; then echo "device_check.sh runs on the device machine only (it links packages into the tree)"; exit 2; fi
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# this throwaway copy of the tree: olmoscope.runtime / .kernels / .schemas as setuptools' package-dir maps them
ln -sfn ../runtime olmoscope/runtime && ln -sfn ../cuda olmoscope/kernels && ln -sfn ../schemas olmoscope/schemas || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OLMOSCOPE_CACHE=/tmp/olmoscope-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import numpy, ml_dtypes, olmoscope.runtime.cuda.backend as c; print('numpy', numpy.__version__, 'ml_dtypes', ml_dtypes.__version__, 'cuda backend', c.available())"
if [ "$1" = tests ] || [ "$1" = all ]; then
    timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -rs ${PYTEST_ARGS:-} tests/test_cuda_kernels.py tests/test_bench_cli.py \
        tests/test_cuda_backend.py 2>&1 | tee "$OUT/tests.log" | grep -v "^tests/.*PASSED"
fi
if [ "$1" = kernels ]; then
    timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -rs ${PYTEST_ARGS:-} tests/test_cuda_kernels.py tests/test_kernel_mirror.py \
        2>&1 | tee "$OUT/kernel_tests.log" | grep -v "^tests/.*PASSED"
    timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_kernels.py --models ${MODELS:-1b,7b} --out "$OUT" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench_kernels.log"
fi
if [ "$1" = profile ]; then
    timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/profile_decode.py --models ${MODELS:-1b,7b} 2>&1 | tee "$OUT/profile.log"
fi
if [ "$1" = bench ] || [ "$1" = all ]; then
    timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_cuda.py --models ${MODELS:-1b,7b} --out "$OUT" ${BENCH_ARGS:-} 2>&1 |
        tee "$OUT/bench.log"
fi
