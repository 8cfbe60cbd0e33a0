#!/bin/bash
# round14.sh's two cases that ran past their limits, with room, and GPT-2 355M fp32 under the default plan again
# with the run's measured asymmetry recorded: its host-vector spectrum switched to whole-basis passes at step 6
# for "the matvec's asymmetry", where the resident fp32 GPT-2 124M runs stay in the estimated regime.
# About 8 minutes on one nvidia-h200.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
run() {  # limit name case max_iter
  echo "$(date +%T) start $2" >> $OUT/a.log
  timeout $1 python3 $S models --cases $3 --metric-options "{\"spectrum\":{\"max_iter\":$4}}" \
    --out $OUT/$2.json >> $OUT/a.log 2>&1
  rc=$?
  echo "$(date +%T) end $2 rc $rc" >> $OUT/a.log
}
run 190 gpt2_355m_bf16_plan gpt2-355m:bf16:spectrum 30
run 190 llama_1b_bf16_ratio4 llama-1b:bf16:spectrum:4 30
run 150 gpt2_355m_fp32_plan_asym gpt2-355m:fp32:spectrum 8
rm -rf $OUT/run-* 2>/dev/null
for f in $OUT/*.json; do python3 -c "
import json; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']; p=d['cost']['memory_plan']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3),
 'steps', s['steps'], s.get('reorth_regime'), 'asym', s.get('hvp_asymmetry'), 'basis', p.get('basis_device'), 'vectors', p.get('vectors'), 'mb', p.get('micro_batch_size'))
"; done
grep "start\|end" $OUT/a.log
grep -h "Error\|error" $OUT/a.log | grep -v transformers | tail -5 | cut -c1-300
