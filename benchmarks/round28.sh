#!/bin/bash
# One short nvidia-h200 call: the 1B Llama bf16 spectrum (10 steps) at peak_ratio 4, where the memory plan
# (plan_memory with round18's figures) first keeps the vectors on the device: the time outside the products
# once the memory allows device vectors (at the default 1.5x: host vectors, 79.6 % outside in round24).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 150 llama_1b_bf16_peak4_plan10 llama-1b:bf16:spectrum:4.0 10
summary
