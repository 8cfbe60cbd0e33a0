#!/bin/bash
# the eleventh round's device call: the delayed whole-basis pass (linalg/delayed_lanczos.py) on GPT-2 124M bf16
# under the default 1.5x plan (its basis offloaded to host memory, a pass at every step), against the same run
# with the delayed loop switched off, in one call; the GPU test of the delayed loop first.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
timeout 120 python3 -m pytest -q -p no:randomly tests/test_delayed_lanczos.py > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log
timeout 200 python3 benchmarks/delayed_profile.py --out $OUT/delayed_profile.json > $OUT/a.log 2>&1
mv $OUT/delayed_profile.json.scale.json $OUT/spec_plan_delayed.json
timeout 200 python3 -c "
import importlib, runpy, sys
L = importlib.import_module('geomprobe.linalg.lanczos')
L.delayed_due = lambda *a: False
sys.argv = ['$S', 'models', '--cases', 'gpt2-124m:bf16:spectrum', '--out', '$OUT/spec_plan_ordinary.json']
runpy.run_path('$S', run_name='__main__')
" >> $OUT/a.log 2>&1
rm -rf $OUT/run-* 2>/dev/null
ls $OUT
for f in $OUT/spec_plan_*.json; do python3 -c "
import json,sys; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3),
 'lmax', s['lambda_max'], s['lambda_max_err'], 'lmin', s['lambda_min'], s['lambda_min_err'], 'conv', s['converged'], 'steps', s['steps'], s.get('reorth_regime'))
"; done
grep -h '"median"' $OUT/a.log | cut -c1-400; grep -h "Error\|error" $OUT/a.log | grep -v transformers | tail -5 | cut -c1-300
