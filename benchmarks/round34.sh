#!/bin/bash
# One nvidia-h200 call, about 9 minutes: where CUDA's half-type products round (benchmarks/cuda_rounding.py: the
# GPU tests of sub_rows failed in round33) and which SDPA kernel torch picks at small head dimensions; then the
# probe's overhead on GPT-2 124M bf16 at the default schedule over 12,000 steps with the loop without a probe run
# before and after the long loop (round31's comparison, 16.1 %, was against one 400-step baseline).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 60 python3 benchmarks/cuda_rounding.py --out $OUT/cuda_rounding.json > $OUT/cuda_rounding.log 2>&1
echo "cuda_rounding rc $?" >> $OUT/cuda_rounding.log
timeout 500 python3 benchmarks/scale.py overhead --model gpt2-124m --dtypes bf16 --steps 12000 --baseline-steps 400 \
  --out $OUT/overhead_gpt2_124m_bf16_12k.json > $OUT/overhead.log 2>&1
echo "overhead rc $?" >> $OUT/overhead.log
tail -c 3000 $OUT/overhead.log
