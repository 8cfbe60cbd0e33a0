#!/bin/bash
# A lean plan's first six rows page-locked while the Landscape builds (pinned_memory.warm(count=...)), not one
# ahead beside the streamed products: GPU tests of the page-locked and lean files, then the 1B Llama's bf16
# spectrum under the default plan, 10 steps, two probes (the first probe is the one this changes).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2" run 130 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
bash benchmarks/gpu_tests.sh 90 tests/test_pinned_memory.py tests/test_lean_lanczos.py tests/test_lean_vectors_pending.py \
  > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
