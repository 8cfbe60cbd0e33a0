#!/bin/bash
# Inner products measured from sketches (linalg/sketched_gram.py, measured_reorth.py): the GPU tests of the
# files they touch, the sketch's cost on a 1.1B bf16 vector, then the 1B Llama's bf16 spectrum under the default
# plan, 10 steps in two probes (issue 16's figure) and 30 steps in one (where passes come back).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 150 tests/test_sketched_gram.py tests/test_lean_lanczos.py tests/test_lean_pass.py \
  > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
timeout 90 python3 benchmarks/sketch_cost.py --out $OUT/sketch_cost.json 2>&1 | tail -5
S="benchmarks/scale.py --repeat 2" run 150 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py" run 150 llama_1b_bf16_plan30 llama-1b:bf16:spectrum 30
summary
python3 benchmarks/later_summary.py
