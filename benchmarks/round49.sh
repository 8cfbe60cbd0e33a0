#!/bin/bash
# Lean runs that give their newest vector back after each step, and the streamed mode (each product reads its
# input from the host row) the plan now takes for the 1B Llama in bf16: the GPU tests of the changed files and
# those round48 left (cut by its limit), then the 1B Llama's spectrum under the default 1.5x plan in bf16 and fp32,
# two probes each, the later one with its memory peaks by allocating frames.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 160 tests/test_lean_lanczos.py tests/test_ritz_rows.py tests/test_segmented_products.py \
  tests/test_vectors.py tests/test_views.py tests/test_warm_start.py tests/test_restarted_lanczos.py \
  tests/test_capped_partial.py tests/test_host_stream.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -20
S="benchmarks/scale.py --repeat 2 --memory-history" run 170 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --repeat 2 --memory-history" run 190 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py --memory
