#!/bin/bash
# The lean step's previous vector added into the product's output beside the product (krylov_step's prefill) and
# the first page-locked row warmed while the Landscape builds: the GPU tests of both, then the 1B Llama under the
# default plan in fp32 and bf16 (10 steps, two probes each), against round53 / round52.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 120 tests/test_lean_prefill.py tests/test_lean_lanczos.py tests/test_pinned_memory.py \
  > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --repeat 2" run 170 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 150 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
