#!/bin/bash
# The Ritz pass's rows added by elementwise kernels (round51: a rank-one addmm_ per row ran at ~160 GB/s and held
# the host, 23.7 GB/s for the pass against the bus's 54): the Ritz GPU tests, the 1B Llama's spectrum under the
# default 1.5x plan in fp32 (device inputs) and bf16 (streamed), two probes each, then benchmarks/ritz_pass.py.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
bash benchmarks/gpu_tests.sh 45 tests/test_ritz_rows.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -5
S="benchmarks/scale.py --repeat 2" run 165 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 140 llama_1b_bf16_plan10 llama-1b:bf16:spectrum 10
summary
python3 benchmarks/later_summary.py
timeout 80 python3 benchmarks/ritz_pass.py --rows 4 --repeats 3 --out $OUT/ritz_pass.json > $OUT/ritz_pass.log 2>&1
tail -c 1200 $OUT/ritz_pass.log
