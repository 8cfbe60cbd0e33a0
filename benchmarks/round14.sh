#!/bin/bash
# The default-plan spectra whose outside share was not measured since the delayed loop (round13.sh's first
# three cases ran past limits set for fewer steps), and the 1B Llama in bf16 with the vectors on the device
# (peak ratio 4: the basis offloaded, the delayed loop's passes beside the products) against its host-vector
# default. Each case in its own process and limit, so the earlier ones come back if a later one runs over.
# About 9 minutes on one nvidia-h200.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
run() {  # limit name case max_iter
  echo "$(date +%T) start $2" >> $OUT/a.log
  timeout $1 python3 $S models --cases $3 --metric-options "{\"spectrum\":{\"max_iter\":$4}}" \
    --out $OUT/$2.json >> $OUT/a.log 2>&1
  rc=$?; echo "$(date +%T) end $2 rc $rc" >> $OUT/a.log
}
run 150 gpt2_124m_fp32_plan gpt2-124m:fp32:spectrum 40
run 130 gpt2_355m_bf16_plan gpt2-355m:bf16:spectrum 30
run 150 gpt2_355m_fp32_plan gpt2-355m:fp32:spectrum 16
run 120 llama_1b_bf16_ratio4 llama-1b:bf16:spectrum:4 40
rm -rf $OUT/run-* 2>/dev/null
for f in $OUT/*.json; do python3 -c "
import json; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']; p=d['cost']['memory_plan']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3),
 'steps', s['steps'], s.get('reorth_regime'), 'basis', p.get('basis_device'), 'vectors', p.get('vectors'), 'mb', p.get('micro_batch_size'))
"; done
grep "start\|end" $OUT/a.log
grep -h "Error\|error" $OUT/a.log | grep -v transformers | tail -5 | cut -c1-300
