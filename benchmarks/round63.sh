#!/bin/bash
# Where the 1B Llama's first bf16 probe spends its extra second outside the products: the gaps between its HVPs
# (scale.py gaps_ms) with the sketch store from torch's page-locked allocator (as before) and from an exact-size
# block mapped during the build (POOLED) and the signs from random bytes (SIGNS); and ways to draw the sketch's signs faster (sketch_variants.py).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
timeout 80 python3 benchmarks/sketch_variants.py --out $OUT/sketch_variants.json 2>&1 | tail -8
S="benchmarks/scale.py --repeat 2 --set linalg.sketched_gram.POOLED=false --set linalg.sketched_gram.SIGNS=\"draws\"" run 170 llama_1b_bf16_torchstore llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --repeat 2" run 170 llama_1b_bf16_pooled llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
for f in $OUT/llama*.json; do python3 -c "
import json; r=json.load(open('$f'))['results'][0]
print('$f'.split('/')[-1], 'first gaps', r.get('gaps_ms'), 'pinned', r.get('pinned'))
for lp in r.get('later_probes', []): print('  later gaps', lp.get('gaps_ms'))
"; done
