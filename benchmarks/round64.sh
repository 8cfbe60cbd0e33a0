#!/bin/bash
# The 1B Llama's bf16 spectrum under the default plan (10 steps, two probes) profiled: what its first probe does
# before its first product (about 0.8 s more than a later probe's), with the callers of the heaviest functions.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2 --profile 80" run 200 llama_1b_bf16_profile llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
python3 -c "
import json; r=json.load(open('$OUT/llama_1b_bf16_profile.json'))['results'][0]
print('first gaps', r.get('gaps_ms'))
for lp in r.get('later_probes', []): print('later gaps', lp.get('gaps_ms'))
"
