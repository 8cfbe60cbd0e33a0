#!/bin/bash
# Prepared for the next device call (not run yet), about 9 minutes on one nvidia-h200:
#   1. what makes GPT-2 355M fp32 on host vectors 1,000x less symmetric than resident (hvp_symmetry.py, each
#      setting of the default plan alone and together; RESULTS section 6, thirteenth round)
#   2. GPT-2 355M bf16 under the default plan, 30 steps (the delayed loop over an offloaded basis; ran past 130
#      and 190 s in round14 and round14b without a trace; now with progress lines in a.log)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
echo "$(date +%T) start symmetry" >> $OUT/a.log
timeout 240 python3 benchmarks/hvp_symmetry.py --model gpt2-355m --dtype fp32 --pairs 3 \
  --out $OUT/hvp_symmetry_355m_fp32.json >> $OUT/a.log 2>&1
echo "$(date +%T) end symmetry rc $?" >> $OUT/a.log
run 290 gpt2_355m_bf16_plan gpt2-355m:bf16:spectrum 30
grep '"setting"' $OUT/a.log | cut -c1-300
summary
