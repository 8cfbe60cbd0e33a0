#!/bin/bash
# Planned for the next session (one nvidia-h200 call, about 8 minutes; not run yet): the 1B Llama's product under
# its default plan (host vectors at 1.5x) with input and output on the host, on the device, and input on the host
# with output on the device (benchmarks/product_placement.py: times, peaks above the allocated memory, agreement),
# fp32 and bf16 (lean runs: 2.15 s a product with both on the device against 4.4 s on the host, fp32); then every
# GPU test by name (benchmarks/gpu_tests.sh).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for dt in fp32 bf16; do
  timeout 150 python3 benchmarks/product_placement.py --model llama-1b --dtype $dt --repeats 2 \
    --out $OUT/product_placement_llama_1b_$dt.json > $OUT/placement_$dt.log 2>&1
  grep -E "^(host|device)_" $OUT/placement_$dt.log | cut -c1-300
done
bash benchmarks/gpu_tests.sh 170 > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc " $OUT/gpu_tests.log | tail -20
