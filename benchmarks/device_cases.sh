#!/bin/bash
# Shared by the device-call scripts (round14.sh, round14b.sh): `run LIMIT NAME CASE MAX_ITER` runs one
# `scale.py models` case in its own process under its own limit (a case killed by it leaves its progress lines
# in $OUT/a.log), and `summary` prints one line per result and the cases' start and end times.
S=benchmarks/scale.py
run() {
  echo "$(date +%T) start $2" >> $OUT/a.log
  timeout $1 python3 $S models --cases $3 --metric-options "{\"spectrum\":{\"max_iter\":$4}}" \
    --out $OUT/$2.json >> $OUT/a.log 2>&1
  rc=$?; echo "$(date +%T) end $2 rc $rc" >> $OUT/a.log
}
summary() {
  rm -rf $OUT/run-* 2>/dev/null
  for f in $OUT/*.json; do python3 -c "
import json; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']; p=d['cost']['memory_plan']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'] or 0,3),
 'steps', s['steps'], s.get('reorth_regime'), 'asym', s.get('hvp_asymmetry'), 'basis', p.get('basis_device'),
 'vectors', p.get('vectors'), 'working', p.get('working_vectors'), 'mb', p.get('micro_batch_size'))
"; done
  grep -E '^[0-9:]{8} (start|end)|^\[ *[0-9.]+ s\] (start|end)' $OUT/a.log
  grep -h "Error" $OUT/a.log | grep -v "transformers\|^{\|^\[{" | tail -5 | cut -c1-300
}
