#!/bin/bash
# the tenth round's second device call on one GPU (no two-GPU machine lent): warm starts moved on along a GPT-2
# 124M trajectory (residual bounds a probe every step and every 5 steps; certified a probe every step), then the
# 1B Llama in host-vector mode, one after the other.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
timeout 170 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 20 --every 1 --risk none \
  --out $OUT/traj_every1_residual.json > $OUT/a.log 2>&1
timeout 150 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 60 --every 5 --risk none \
  --out $OUT/traj_every5_residual.json >> $OUT/a.log 2>&1
timeout 110 python3 $S models --cases llama-1b:bf16:spectrum --metric-options '{"spectrum":{"max_iter":8}}' \
  --profile 30 --out $OUT/llama_host.json >> $OUT/a.log 2>&1
timeout 120 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 10 --every 1 \
  --out $OUT/traj_every1_certified.json >> $OUT/a.log 2>&1
rm -rf $OUT/run-* 2>/dev/null
ls $OUT; grep -h '"probes"' $OUT/a.log | cut -c1-400; grep -v "transformers\]" $OUT/a.log | grep -v '"step"' | tail -6 | cut -c1-300
