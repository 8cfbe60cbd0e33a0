#!/bin/bash
# the ninth round's last device call: which rule ends the selective regime on GPT-2 (resident and under the plan)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
jobA() {
  export CUDA_VISIBLE_DEVICES=0
  python3 $S models --cases gpt2-124m:bf16:spectrum:100 --out $OUT/spec_resident_regime.json > $OUT/a.log 2>&1
}
jobB() {
  export CUDA_VISIBLE_DEVICES=1
  python3 $S models --cases gpt2-124m:fp32:spectrum:100 --out $OUT/spec_resident_fp32_regime.json > $OUT/b.log 2>&1
}
jobA & jobB & wait
rm -rf $OUT/run-* 2>/dev/null
ls $OUT
