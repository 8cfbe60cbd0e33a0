#!/bin/bash
# The final code of this round: the Ritz vectors formed only when read (LazyRitzPair), the first page-locked row
# mapped while the Landscape builds, a lean whole-basis step's newest and previous rows read once with the pass
# (linalg/lean_pass.py). GPU tests of the files these touch, then the 1B Llama in fp32 and bf16 under the default
# plan, 10 steps, two probes each.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 100 tests/test_lean_lanczos.py tests/test_lazy_ritz.py tests/test_pinned_memory.py \
  tests/test_host_stream.py tests/test_lean_pass.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --repeat 2" run 150 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 120 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
