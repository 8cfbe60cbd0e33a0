#!/bin/bash
# Huge pages for page-locked blocks by default and the sketch's kernels loaded beside the build: the 1B Llama's
# bf16 spectrum under the default plan, 10 steps, three probes, with the host time of the sketch's parts; then the
# GPU tests of the files this round touched.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
T=linalg.sketched_gram:SketchedGram.measure,linalg.sketched_gram:SketchedGram.push,linalg.sketched_gram:SignHashSketch.apply
T=$T,linalg.sketched_gram:SketchedGram._products_on,linalg.lanczos:start_basis,linalg.lanczos:measured_step
S="benchmarks/scale.py --repeat 3 --time-calls $T" run 220 llama_1b_bf16_final llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
python3 -c "
import json; d=json.load(open('$OUT/llama_1b_bf16_final.json')); r=d['results'][0]
print('thp', d['environment'].get('transparent_huge_pages'), 'first gaps', r.get('gaps_ms'), r.get('pinned'))
for k, v in r.get('calls_ms', {}).items(): print('  ', k, v)
for lp in r.get('later_probes', []):
    print('later gaps', lp.get('gaps_ms'))
    for k, v in lp.get('calls_ms', {}).items(): print('  ', k, v)
"
bash benchmarks/gpu_tests.sh 150 tests/test_sketched_gram.py tests/test_pinned_memory.py tests/test_pinned_blocks.py \
  tests/test_lean_lanczos.py tests/test_lean_vectors_pending.py tests/test_host_blocks.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
