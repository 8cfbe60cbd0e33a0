#!/bin/bash
# The lean step's prefill (previous vector added into the product's output) against reading it after the product,
# on the 1B Llama in fp32 in one call (round54 found no gain: compared here within one call, cProfile of both);
# the Ritz vectors formed only when read (metrics.ritz_vectors.LazyRitzPair); bf16 with both; the GPU tests of
# the new files.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 100 tests/test_lean_prefill.py tests/test_lazy_ritz.py tests/test_host_stream.py \
  > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --repeat 2 --profile 40" run 150 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2 --profile 40 --prefill off" run 150 llama_1b_fp32_noprefill10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 120 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py --profile 14
