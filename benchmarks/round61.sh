#!/bin/bash
# The sketches' bucket products on the device (stored sketches page-locked, copied over 16 at a time): the sketch's
# cost, the 1B Llama's bf16 spectrum under the default plan (10 steps, three probes), then every GPU test.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
timeout 50 python3 benchmarks/sketch_cost.py --stored 10,40 --out $OUT/sketch_cost.json 2>&1 | tail -3
S="benchmarks/scale.py --repeat 3" run 160 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
bash benchmarks/gpu_tests.sh 200 > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
