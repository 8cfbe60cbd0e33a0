#!/bin/bash
# round49 again after its fix (the host-vector Landscape now writes a product of a host input into a device
# output: the streamed lean mode's), with the page-locked work counted per probe and the fp32 later probe's
# profile: the GPU tests of the changed files, the 1B Llama's spectrum under the default 1.5x plan in bf16
# (streamed, memory peaks by allocating frames) and fp32 (device inputs, cProfile of the later probe).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 120 tests/test_lean_lanczos.py tests/test_ritz_rows.py tests/test_host_stream.py \
  tests/test_pinned_blocks.py tests/test_hvp_out.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -20
S="benchmarks/scale.py --repeat 2 --memory-history" run 180 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --repeat 2 --profile 30" run 200 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py --memory --profile 30
