#!/bin/bash
# One nvidia-h200 call (~4 minutes): the 1B Llama's product (fp32, default plan: host vectors at 1.5x, every graph
# rebuilt) in each placement of its input and output, with each one's device peak above what was allocated, and
# the lean placement (both on the device) with 1.5 and 3 GB of each rebuilt graph's saved tensors moved to host
# memory while it waits (benchmarks/product_placement.py --offload-gb); the lean-choice GPU test, rewritten again.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
bash benchmarks/gpu_tests.sh 60 tests/test_lean_lanczos.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert|Error" $OUT/gpu_tests.log | tail -8 | cut -c1-400
cd benchmarks
timeout 300 python3 product_placement.py --model llama-1b --dtype fp32 --repeats 2 --offload-gb 1.5,3 \
  --out $OUT/product_placement_llama_1b_fp32.json > $OUT/placement_fp32.log 2>&1
grep -E "^(host|device)_|Error|error" $OUT/placement_fp32.log | cut -c1-300
grep rel_diff $OUT/placement_fp32.log
