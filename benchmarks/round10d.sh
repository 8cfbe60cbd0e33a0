#!/bin/bash
# the tenth round's last device call (one GPU): the full set after the noise statistics' change, the noise cost at
# 124M, and warm starts along a later stretch of the GPT-2 trajectory (probes from step 300, every step).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
timeout 200 python3 $S models --cases gpt2-124m:bf16:spectrum+trace+density+rmed+diagshare+noise+precond:100 \
  --out $OUT/full_set.json > $OUT/a.log 2>&1
timeout 170 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 320 --first 300 --every 1 --risk none \
  --out $OUT/traj_late_every1_residual.json >> $OUT/a.log 2>&1
[ -f benchmarks/noise_cost.py ] && timeout 90 python3 benchmarks/noise_cost.py --device cuda --out $OUT/noise_cost.json >> $OUT/a.log 2>&1
rm -rf $OUT/run-* 2>/dev/null
ls $OUT; grep -h '"probes"\|"probe_seconds"' $OUT/a.log | cut -c1-400; grep -v "transformers\]" $OUT/a.log | grep -v '"step"' | tail -5 | cut -c1-400
