#!/bin/bash
# Prepared for the next device call (not run yet), about 9 minutes on one nvidia-h200:
#   1. the 1B Llama in bf16 with its vectors on the device (peak ratio 4: the basis offloaded, the delayed loop),
#      30 steps (ran past 120 and 190 s in round14 and round14b without a trace)
#   2. the 1B Llama in fp32 under the default plan (host vectors, the basis capped at ~14 rows by the host share:
#      partial reorthogonalization after the cap now, if its product is symmetric enough), 16 steps
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 270 llama_1b_bf16_ratio4 llama-1b:bf16:spectrum:4 30
run 300 llama_1b_fp32_plan llama-1b:fp32:spectrum 16
summary
