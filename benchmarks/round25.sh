#!/bin/bash
# One nvidia-h200 call, about 8 minutes:
#   1. host norms at 16 threads on the device's host (benchmarks/host_norms.py): chunk_norm_sq against the
#      pairwise chunk_dot it replaced (measured on one thread only), and the bf16 -> float32 conversion that
#      bounds the host-vector passes;
#   2. the probe's overhead on GPT-2 124M bf16 training at the default schedule over 12,000 steps (last measured
#      1.80 % before the plan changes of the fifteenth round).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
lscpu | grep -E "Model name|^CPU\(s\)" > $OUT/a.log
timeout 60 python3 benchmarks/host_norms.py --dim 2.2e8 --threads 16 --out $OUT/host_norms_t16.json >> $OUT/a.log 2>&1
timeout 30 python3 benchmarks/host_norms.py --dim 2.2e8 --threads 1 --repeats 3 --out $OUT/host_norms_t1.json >> $OUT/a.log 2>&1
timeout 480 python3 benchmarks/scale.py overhead --model gpt2-124m --dtypes bf16 --steps 12000 --baseline-steps 400 \
  --out $OUT/overhead_gpt2_124m_bf16_12k.json > $OUT/overhead.log 2>&1
echo "overhead rc $?" >> $OUT/a.log
cat $OUT/a.log
tail -c 3000 $OUT/overhead.log
