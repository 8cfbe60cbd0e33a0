#!/bin/bash
# The offloaded Ritz pass on page-locked rows of the 1B Llama's length (benchmarks/ritz_pass.py: whole rows in one
# copy against column slices, and the bus's speed for the same bytes), then the 1B Llama fp32 spectrum under the
# default 1.5x plan (its Ritz pass now takes whole rows), two probes, cProfile of the later one.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 60 tests/test_ritz_rows.py tests/test_lean_lanczos.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -5
timeout 120 python3 benchmarks/ritz_pass.py --rows 4 --repeats 3 --out $OUT/ritz_pass.json > $OUT/ritz_pass.log 2>&1
tail -c 1500 $OUT/ritz_pass.log
S="benchmarks/scale.py --repeat 2 --profile 30" run 200 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py --profile 30
