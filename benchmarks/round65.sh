#!/bin/bash
# The 1B Llama's bf16 spectrum under the default plan (10 steps, two probes) with the host time of the Lanczos run's
# parts (scale.py --time-calls): what its first probe does outside its products that a later probe does not.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
T=metrics.spectrum:_warm_lanczos,metrics.spectrum:lanczos,linalg.lanczos:start_basis,linalg.lanczos:sketched_gram
T=$T,linalg.sketched_gram:SketchedGram.measure,linalg.sketched_gram:SketchedGram.push,linalg.lanczos:measured_step
T=$T,linalg.lanczos:krylov_step,linalg.lanczos:ritz_pairs,linalg.lanczos:prefetch_solver,linalg.lanczos:extreme_errors
T=$T,linalg.krylov_basis:LanczosBasis.append,linalg.krylov_basis:LanczosBasis.release_work,linalg.krylov_basis:populate
T=$T,linalg.pinned_blocks:PinnedAhead.take,linalg.pinned_blocks:PinnedAhead.close,probe.warm_start:WarmStart.keep
T=$T,probe.warm_start:WarmStart.start,linalg.lean_vectors:LeanVectors.refill,linalg.lean_vectors:LeanVectors.release
T=$T,linalg.sketched_gram:pinned_empty,engine.landscape:Landscape.hvp
S="benchmarks/scale.py --repeat 2 --time-calls $T" run 200 llama_1b_bf16_calls llama-1b:bf16:spectrum 10
summary
python3 -c "
import json; r=json.load(open('$OUT/llama_1b_bf16_calls.json'))['results'][0]
print('first gaps', r.get('gaps_ms'))
for k, v in r.get('calls_ms', {}).items(): print('  ', k, v)
for lp in r.get('later_probes', []):
    print('later gaps', lp.get('gaps_ms'))
    for k, v in lp.get('calls_ms', {}).items(): print('  ', k, v)
"
# page-locked blocks backed by transparent huge pages: the driver pins 2 MiB pages (registration time per block in
# pinned ahead_seconds; the first probe's products and gaps)
S="benchmarks/scale.py --repeat 2 --set linalg.pinned_memory.HUGE_PAGES=true" run 200 llama_1b_bf16_huge llama-1b:bf16:spectrum 10
python3 -c "
import json; d=json.load(open('$OUT/llama_1b_bf16_huge.json')); r=d['results'][0]
print('thp', d['environment'].get('transparent_huge_pages'), 'first', round(r['probe_hvp_seconds'], 2), 'hvp s', 'gaps', r.get('gaps_ms'), 'pinned', r.get('pinned'))
for lp in r.get('later_probes', []): print('later gaps', lp.get('gaps_ms'), round(lp['probe_hvp_seconds'], 2))
"
summary
