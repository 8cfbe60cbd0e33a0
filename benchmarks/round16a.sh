#!/bin/bash
# One nvidia-h200 call, about 7 minutes:
#   1. which setting of GPT-2 355M fp32's default plan makes its product asymmetric (5.7e-5 of ||T|| in
#      round14b), now with Krylov pairs (hvp_symmetry.py; random pairs measured 7.5e-11 in round15a) and each
#      setting's seconds per product
#   2. GPT-2 355M bf16 under the default plan, 10 steps, its plan printed before the first product (round15a's
#      30-step run reached 25 products in 210 s, each 5 slower than the last, and recorded no plan)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
echo "$(date +%T) start symmetry" >> $OUT/a.log
timeout 230 python3 benchmarks/hvp_symmetry.py --model gpt2-355m --dtype fp32 --pairs 2 \
  --settings resident,micro_batch_1,rebuilt,host_vectors,host_rebuilt \
  --out $OUT/hvp_symmetry_355m_fp32_krylov.json >> $OUT/a.log 2>&1
echo "$(date +%T) end symmetry rc $?" >> $OUT/a.log
run 170 gpt2_355m_bf16_plan10 gpt2-355m:bf16:spectrum 10
grep '"setting"\|"plan"' $OUT/a.log | cut -c1-400
summary
