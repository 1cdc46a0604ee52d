#!/usr/bin/env bash
# One call on the GPU machine (docs/PERFORMANCE.md): install the carried wheels, map the package the way
# setuptools' package-dir does, then run each named job in order, logs under $OUT.
#   benchmarks/device_check.sh JOB...   with JOB one of
#     tests    the CUDA tests (kernels alone, the Python/CUDA mirror, the backend, bench CLI)
#     kernels  bench_kernels.py (each kernel's time and bandwidth at 1B/7B shapes)
#     quant    the int4/int8 kernels (gemm_quant.cu): their tests, the projection tests beside them, and
#              bench_kernels.py --quant-only (µs and % of copy bandwidth next to bf16)
#     batch    bench_batch.py (the batched runtime against transformers)
#     bench    bench_cuda.py (batch-1 prefill and decode against transformers)
#     serve    bench_serve.py (olmoscope serve under load against the offline loop and transformers)
#     old      the previous runtime's batch-1 figures, from a tree unpacked in old/ (git archive REV), same card
#   PYTEST_K=EXPR passes -k EXPR to the tests job; TEST_TIMEOUT, BENCH_TIMEOUT, MODELS, BENCH_ARGS, BATCH_ARGS tune the rest
set -o pipefail
if [ -z "${OUT:-}" ]; then echo "device_check.sh runs on the device machine only (it links packages into the tree)"; exit 2; fi
mkdir -p "$OUT"
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
link_packages() { ln -sfn ../runtime olmoscope/runtime && ln -sfn ../cuda olmoscope/kernels && ln -sfn ../schemas olmoscope/schemas; }
link_packages || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OLMOSCOPE_CACHE=/tmp/olmoscope-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import numpy, ml_dtypes, olmoscope.runtime.cuda.backend as c; print('numpy', numpy.__version__, 'ml_dtypes', ml_dtypes.__version__, 'cuda backend', c.available())"
for job in "$@"; do
    echo "=== $job ($(date +%T))"
    case "$job" in
    tests)
        timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -rs ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} tests/test_kernel_mirror.py \
            tests/test_cuda_kernels.py tests/test_cuda_backend.py tests/test_bench_cli.py tests/test_nccl.py tests/test_cuda_quant_kernels.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/tests.log" |
            grep -v "^tests/.*PASSED" ;;
    quant)
        timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rs ${PYTEST_ARGS:-} tests/test_cuda_quant_kernels.py \
            tests/test_cuda_kernels.py -k "q4 or q8 or gemv or gemm_with_the_planned or int8_gemm" 2>&1 |
            tee "$OUT/quant_tests.log" | grep -v "^tests/.*PASSED"
        timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_kernels.py --models ${MODELS:-1b,7b} --quant-only \
            --out "$OUT" 2>&1 | tee "$OUT/quant_bench.log" ;;
    kernels)
        timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_kernels.py --models ${MODELS:-1b,7b} --out "$OUT" 2>&1 |
            tee "$OUT/bench_kernels.log" ;;
    batch)
        timeout ${BENCH_TIMEOUT:-500} python3 benchmarks/bench_batch.py --models ${MODELS:-1b,7b} --out "$OUT" \
            ${BATCH_ARGS:-} 2>&1 | tee "$OUT/batch.log" ;;
    bench)
        timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_cuda.py --models ${MODELS:-1b,7b} --out "$OUT" ${BENCH_ARGS:-} \
            2>&1 | tee "$OUT/bench.log" ;;
    serve)
        timeout ${BENCH_TIMEOUT:-500} python3 benchmarks/bench_serve.py --models ${MODELS:-1b,7b} --out "$OUT" \
            ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log" ;;
    old)
        (cd old && link_packages && PYTHONPATH=/tmp/site:$PWD OLMOSCOPE_CACHE=/tmp/olmoscope-cache-old timeout \
            ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_cuda.py --models ${MODELS:-1b,7b} --skip-transformers \
            --out "$OUT/old") 2>&1 | tee "$OUT/old.log" ;;
    *) echo "unknown job $job"; exit 2 ;;
    esac
done
