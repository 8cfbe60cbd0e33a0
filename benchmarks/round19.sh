#!/bin/bash
# One nvidia-h200 call, about 8 minutes: the default plans with the attention chosen by predicted time per HVP
# (the recomputing attention only for larger micro-batches, or for enough more graphs kept to pay for its 1.36x
# products) and with no graph kept where none fits. Before (eighteenth round and the thirteenth/twelfth):
#   GPT-2 124M fp32, 40 steps: 54.6 s, 8.3 % outside, 1.14x (recomputing attention, 2 of 8 kept)
#   GPT-2 124M bf16, 60 steps: 70.0 s, 4.3 % outside, 1.37x (recomputing attention, 3 of 8 kept)
#   GPT-2 355M fp32, 12 steps: 38.9 s, 10.3 % outside, 1.11x (recomputing attention, 1 of 8 kept)
#   GPT-2 355M bf16, 10 steps: 27.1 s, 11.5 % outside, 1.03x (recomputing attention, 1 of 8 kept)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 110 gpt2_124m_fp32_plan40 gpt2-124m:fp32:spectrum 40
run 120 gpt2_124m_bf16_plan60 gpt2-124m:bf16:spectrum 60
run 90 gpt2_355m_fp32_plan12 gpt2-355m:fp32:spectrum 12
run 80 gpt2_355m_bf16_plan10 gpt2-355m:bf16:spectrum 10
grep '"attention"' $OUT/a.log | grep -o '"reason": "[^"]*"' | cut -c1-250
summary
