#!/bin/bash
# One nvidia-h200 call (~4 minutes; its first form kept every graph, the Landscape having room without the
# optimizer state: now the plan is told to rebuild them): the 1B Llama's product (fp32, host vectors, every graph
# rebuilt) in each placement of its input and output, with each one's device peak above what was allocated, and
# the lean placement (both on the device) with 1.5 and 3 GB of each rebuilt graph's saved tensors moved to host
# memory while it waits (benchmarks/product_placement.py --offload-gb); the lean-choice GPU test, rewritten again.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cd benchmarks
timeout 300 python3 product_placement.py --model llama-1b --dtype fp32 --repeats 2 --offload-gb 1,2,3 \
  --out $OUT/product_placement_llama_1b_fp32.json > $OUT/placement_fp32.log 2>&1
grep -E "^(host|device)_|Error|error" $OUT/placement_fp32.log | cut -c1-300
grep rel_diff $OUT/placement_fp32.log
