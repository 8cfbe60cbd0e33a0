#!/bin/bash
# One nvidia-h200 call, about 8 minutes: the probe's overhead on GPT-2 124M bf16 training at the default
# schedule over 12,000 steps, with the loop without a probe now warmed up as the loop with it is (50 untimed
# steps before both; the sixteenth round measured the probe's own share, 4.67 %, but not this comparison).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 560 python3 benchmarks/scale.py overhead --model gpt2-124m --dtypes bf16 --steps 12000 --baseline-steps 400 \
  --out $OUT/overhead_gpt2_124m_bf16_12k.json > $OUT/overhead.log 2>&1
echo "overhead rc $?" >> $OUT/overhead.log
tail -c 4000 $OUT/overhead.log
