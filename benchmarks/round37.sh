#!/bin/bash
# Planned for the next session (one nvidia-h200 call, about 9-10 minutes; not run yet):
# - the 1B Llama's fp32 spectrum on its default plan (host vectors, 10 steps) under cProfile (--profile 40):
#   round33 spent ~20 s of its 29.3 s outside the products before the 5th product (41.8 s to the 5th, 25.5 s
#   for the next five, 6.2 s at the end), so the first steps' one-time costs come first (page-locked buffers,
#   first touches of host rows, the draw);
# - the lean 1B fp32 spectrum twice in one process (--repeat 2): a second probe takes its page-locked rows from
#   torch's cache, which shows the lean run without the rows' allocation (round35: 91.1 s page-locked, 48.6 s
#   pageable, 2.15 s a product, 23.2-49.5 s outside);
# - GPT-2 124M bf16's default spectrum after the float32 block-diagonal update (round35 cut it at 80 s);
# - the block-diagonal update's speed against the fused product (profile_rowdots.py, bf16).
# (round38.sh, a second call: where the 1B's products read and write, and every GPU test.)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --profile 40" run 180 llama_1b_fp32_host10_profile llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --working device --repeat 2" run 200 llama_1b_fp32_lean10_repeat llama-1b:fp32:spectrum 10
run 130 gpt2_124m_bf16_spectrum gpt2-124m:bf16:spectrum 300
timeout 60 python3 benchmarks/profile_rowdots.py --rows 2,8,16,22,300 --dtypes bf16 \
  --out $OUT/profile_rowdots_halfsub_h200.json > $OUT/rowdots.log 2>&1; tail -20 $OUT/rowdots.log
summary
