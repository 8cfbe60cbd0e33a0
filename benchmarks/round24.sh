#!/bin/bash
# One nvidia-h200 call, at most ~9.5 minutes: the 1B Llama under the default 1.5x plan (host vectors: no plan with
# device vectors fits 7 GB beside its 8.9 GB of weights and AdamW state), with this round's Ritz vectors kept
# without a host copy:
#   1. fp32, 10 steps (last measured in the eighth round: 45 % outside over 3 steps);
#   2. bf16, 10 steps, two probes in the process with a training step between (scale.py --repeat 2): the
#      second is the steady state of a probe in a loop. Eighteenth round (one probe): 110.3 s, 77.5 % outside.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/a.log
run 250 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 320 llama_1b_bf16_plan10_repeat llama-1b:bf16:spectrum 10
grep -h '"later_probe"' $OUT/a.log | cut -c1-400
summary
