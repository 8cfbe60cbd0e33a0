#!/bin/bash
# Measured from the first step that shows the asymmetry (no estimate passes before), sketches without a float32
# copy: the 1B Llama's bf16 spectrum under the default plan, 10 steps in two probes, then the same profiled.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
timeout 60 python3 benchmarks/sketch_cost.py --stored 10 --out $OUT/sketch_cost.json 2>&1 | tail -3
S="benchmarks/scale.py --repeat 2" run 150 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --repeat 2 --profile 45" run 170 llama_1b_bf16_plan10_profile llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
