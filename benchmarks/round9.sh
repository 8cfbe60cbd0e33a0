#!/bin/bash
# one device call: GPU tests, then two single-GPU jobs side by side (issue 16, ninth round)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pytest -q -p no:randomly tests/test_screen_parking.py tests/test_partial_reorth.py tests/test_hvp_out.py > $OUT/gpu_tests.log 2>&1
S=benchmarks/scale.py
jobA() {
  export CUDA_VISIBLE_DEVICES=0
  python3 $S models --cases gpt2-124m:bf16:spectrum --out $OUT/spec_plan_default.json > $OUT/a.log 2>&1
}
jobB() {
  export CUDA_VISIBLE_DEVICES=1
  python3 $S models --cases gpt2-124m:bf16:spectrum:100 --out $OUT/spec_resident_partial.json > $OUT/b.log 2>&1
  python3 $S models --cases llama-1b:bf16:spectrum --metric-options '{"spectrum":{"max_iter":8}}' --out $OUT/llama_host_partial.json >> $OUT/b.log 2>&1
}
jobA & jobB & wait
rm -rf $OUT/run-* 2>/dev/null
ls $OUT; tail -n 3 $OUT/gpu_tests.log
