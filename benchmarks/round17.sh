#!/bin/bash
# Prepared for the next device call (not run yet), about 9 minutes on one nvidia-h200:
#   1. GPT-2 355M fp32 under the default plan (host vectors), 12 steps, with the pairwise host sums: does it stay
#      in the estimated regime, as its resident run does (thirteenth round: whole-basis from step 6 for an
#      "asymmetry" of 5.7e-5, 47 % outside; fourteenth round: the host kernels' sums in order)
#   2. GPT-2 355M bf16 under the default plan, 10 steps, with the next row faulted in beside the product
#      (--prefetch on) against the default (off: torch holds every core); fourteenth round: 5.4 s of 30 s outside
#      went to faulting rows in on the main thread
#   3. the 1B Llama in bf16 under the default plan, 12 steps, bf16 rows, pairwise sums (twelfth round: 97.7 s,
#      69 % outside; with float32 rows this round, 10 products took 146 s)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 150 gpt2_355m_fp32_plan12 gpt2-355m:fp32:spectrum 12
S="benchmarks/scale.py --prefetch on" run 130 gpt2_355m_bf16_plan10_prefetch gpt2-355m:bf16:spectrum 10
run 130 gpt2_355m_bf16_plan10 gpt2-355m:bf16:spectrum 10
run 150 llama_1b_bf16_plan12 llama-1b:bf16:spectrum 12
grep '"plan"' $OUT/a.log | cut -c1-300
summary
