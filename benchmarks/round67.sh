#!/bin/bash
# With huge pages for page-locked blocks now the default (they change every offloaded and lean run's host memory):
# every GPU test, then the 1B Llama's bf16 spectrum under the default plan again (10 steps, two probes) for the
# spread between calls.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 230 > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --repeat 2" run 150 llama_1b_bf16_again llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
