#!/bin/bash
# Every GPU test by name on the final code of the twenty-second round (round53 ran them before its changes).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
bash benchmarks/gpu_tests.sh 200 > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc |assert" $OUT/gpu_tests.log | tail -15
