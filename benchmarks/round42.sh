#!/bin/bash
# One nvidia-h200 call (~8 minutes): the rewritten GPU test of the plan's lean choice (with the other lean and
# page-locked tests); the 1B Llama's lean fp32 spectrum, two probes, the later one profiled and its memory peak
# broken down by where each live block was allocated (scale.py --memory-history: the 0.45 GiB above 1.5x); the
# default plan, two probes, the later one profiled (the kept basis mappings: populate and unmapping should be gone).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 90 tests/test_lean_lanczos.py tests/test_pinned_memory.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert|Error" $OUT/gpu_tests.log | tail -12 | cut -c1-400
S="benchmarks/scale.py --working device --repeat 2 --profile 40 --memory-history" run 200 llama_1b_fp32_lean10_history llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2 --profile 40" run 215 llama_1b_fp32_host10_kept llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py --memory --profile 14
