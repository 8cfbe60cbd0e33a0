#!/bin/bash
# One nvidia-h200 call, about 8 minutes: the default plans after two changes of this round
#   1-2. GPT-2 355M fp32 (12 steps) and bf16 (10 steps) under the default 1.5x plan, which now keeps the vectors
#        on the device and rebuilds every graph per product (the plan no longer keeps the first graph whatever
#        its size, and a rebuilt graph is freed before the next is built); seventeenth round, host vectors:
#        fp32 68.2 s, 27.9 % outside, 1.17x; bf16 58.4 s with the rows faulted in beside the products
#   3. the 1B Llama in bf16 (still host vectors: no device plan fits 7 GB), 10 steps, with the rows faulted in
#      beside the products now by default (CUDA initialized); seventeenth round: 10 products at 107.4 s
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 120 gpt2_355m_fp32_plan12 gpt2-355m:fp32:spectrum 12
run 110 gpt2_355m_bf16_plan10 gpt2-355m:bf16:spectrum 10
run 190 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
grep '"plan"' $OUT/a.log | cut -c1-300
summary
