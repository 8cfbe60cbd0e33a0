#!/bin/bash
# Ran in round48 (results/scale_r48_*, gpu_tests_r48_h200.log; its GPU tests cut by their 170 s limit): every GPU test by name (the
# session that wrote this ran only the lean, Ritz, restart and delayed files), then the 1B Llama's bf16 spectrum
# with lean working vectors forced (its 1.79x was measured while a whole-basis pass held a fourth d-vector, a
# float32 row in bf16 runs), two probes, the later one with its memory peak by allocating frames.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 170 > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -20
S="benchmarks/scale.py --working device --repeat 2 --memory-history" run 200 llama_1b_bf16_lean10_fixed llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py --memory
