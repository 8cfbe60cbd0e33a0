#!/bin/bash
# Planned for the next session (one nvidia-h200 call, ~7 minutes; not run yet): every GPU test by name (round48's
# 170 s limit cut the set after test_segmented_products.py), the Ritz pass against the bus's speed
# (benchmarks/ritz_pass.py: fresh, reused and side-stream rows), then the 1B Llama fp32
# spectrum under the default plan, two probes, cProfile of both (the first probe's 13 % outside).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 240 > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -20
timeout 80 python3 benchmarks/ritz_pass.py --rows 4 --repeats 3 --out $OUT/ritz_pass.json > $OUT/ritz_pass.log 2>&1
tail -c 1500 $OUT/ritz_pass.log
S="benchmarks/scale.py --repeat 2 --profile 40" run 170 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py --profile 30
