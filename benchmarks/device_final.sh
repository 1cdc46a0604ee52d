set +e
export OUT
TEST_TIMEOUT=160 bash benchmarks/device_check.sh tests > $OUT/t.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/t.log | tail -15
MODELS=7b BATCH_ARGS=--skip-transformers BENCH_TIMEOUT=60 bash benchmarks/device_check.sh batch > $OUT/b.log 2>&1
grep -A12 "Decode step" $OUT/b.log | head -14; grep "olmoscope:\|mixed" $OUT/b.log
MODELS=1b,7b BENCH_ARGS="--skip-transformers --int8 --int4" BENCH_TIMEOUT=75 bash benchmarks/device_check.sh bench > $OUT/c.log 2>&1
grep "olmoscope cuda" $OUT/c.log
MODELS=7b,1b SERVE_ARGS=--skip-transformers BENCH_TIMEOUT=150 bash benchmarks/device_check.sh serve > $OUT/s.log 2>&1
grep "^|\|target\|first with" $OUT/s.log | head -20
rm -rf $OUT/t.log $OUT/b.log $OUT/c.log $OUT/s.log $OUT/cuda_section.md $OUT/tmp* ; ls $OUT
