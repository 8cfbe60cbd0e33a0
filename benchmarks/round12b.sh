#!/bin/bash
# the twelfth round's last device call: the probe's peak with the delayed whole-basis pass on GPT-2 124M bf16
# under the default 1.5x plan, after the previous vector was dropped from what the loop holds (60 steps: the
# loop runs from step 13, so the peak is reached well before)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 150 python3 benchmarks/scale.py models --cases gpt2-124m:bf16:spectrum --metric-options '{"spectrum":{"max_iter":60}}' \
  --out $OUT/gpt2_bf16_plan.json > $OUT/a.log 2>&1
rm -rf $OUT/run-* 2>/dev/null
python3 -c "
import json; d=json.load(open('$OUT/gpt2_bf16_plan.json'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']
print('probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'outside', round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3), 'train_peak', d['train_peak_bytes'], 'probe_peak', d['probe_peak_bytes'], 'steps', s['steps'], s.get('reorth_regime'), 'delayed_work', d['cost']['memory_plan']['items'].get('delayed_work'))
"
