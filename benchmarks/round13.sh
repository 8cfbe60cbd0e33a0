#!/bin/bash
# Prepared for the next device call (not run yet): the cases of issue 16 whose outside share is not measured
# under the default plan since the delayed loop, and the delayed loop on a resident basis as an experiment.
#   a. GPT-2 124M fp32, spectrum, default 1.5x plan (basis on the host, capped: the delayed loop from step 12)
#   b. GPT-2 355M bf16 and fp32, spectrum, default plan, 40 steps
#   c. GPT-2 124M bf16, spectrum, everything resident (peak_ratio 100): the ordinary loop, then the delayed loop
#      allowed on a resident basis (its passes are HBM reads; the plan does not count its two vectors there)
#   d. GPT-2 124M fp32, everything resident: capped at the plan's device vectors, partial until the cap now
#      (12.5 % outside in the tenth round with every step a pass)
# About 8 minutes on one nvidia-h200; each case has its own limit, so the earlier ones come back if one runs over.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
timeout 150 python3 $S models --cases gpt2-124m:fp32:spectrum --out $OUT/gpt2_124m_fp32_plan.json >> $OUT/a.log 2>&1
timeout 120 python3 $S models --cases gpt2-355m:bf16:spectrum --metric-options '{"spectrum":{"max_iter":40}}' \
  --out $OUT/gpt2_355m_bf16_plan.json >> $OUT/a.log 2>&1
timeout 150 python3 $S models --cases gpt2-355m:fp32:spectrum --metric-options '{"spectrum":{"max_iter":40}}' \
  --out $OUT/gpt2_355m_fp32_plan.json >> $OUT/a.log 2>&1
timeout 60 python3 $S models --cases gpt2-124m:bf16:spectrum:100 --out $OUT/gpt2_124m_bf16_resident.json >> $OUT/a.log 2>&1
timeout 80 python3 $S models --cases gpt2-124m:fp32:spectrum:100 --out $OUT/gpt2_124m_fp32_resident.json >> $OUT/a.log 2>&1
timeout 60 python3 -c "
import importlib, runpy, sys, torch
D = importlib.import_module('geomprobe.linalg.delayed_lanczos')
L = importlib.import_module('geomprobe.linalg.lanczos')
importlib.import_module('geomprobe.metrics.spectrum').delayed_fits = lambda land: True  # the plan counts nothing here
L.delayed_due = lambda basis, every, steps: (every and torch.device(basis.compute).type == 'cuda'
                                             and not basis.space.sharded and steps >= D.DELAYED_FROM_STEP)
sys.argv = ['$S', 'models', '--cases', 'gpt2-124m:bf16:spectrum:100', '--out', '$OUT/gpt2_124m_bf16_resident_delayed.json']
runpy.run_path('$S', run_name='__main__')
" >> $OUT/a.log 2>&1
rm -rf $OUT/run-* 2>/dev/null
for f in $OUT/*.json; do python3 -c "
import json; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3),
 'steps', s['steps'], s.get('reorth_regime'))
"; done
grep -h "Error\|error" $OUT/a.log | grep -v transformers | tail -5 | cut -c1-300
