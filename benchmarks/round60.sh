#!/bin/bash
# A streamed input's row read after its copy on the device, not waited for by the host (lean_vectors.take_pending),
# and the sketches' host products in a reused buffer: GPU tests of the files touched, then the 1B Llama's bf16
# spectrum under the default plan, 10 steps in three probes, then two probes profiled.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 150 tests/test_lean_vectors_pending.py tests/test_sketched_gram.py \
  tests/test_lean_lanczos.py tests/test_lean_pass.py tests/test_host_stream.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --repeat 3" run 170 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --repeat 2 --profile 60" run 170 llama_1b_bf16_plan10_profile llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
