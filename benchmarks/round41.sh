#!/bin/bash
# One nvidia-h200 call (~4 minutes): every GPU test by name after the exact-size page-locked pool and the plan's
# own choice of lean working vectors (tests/test_lean_lanczos.py's GPU test of that choice among them).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
bash benchmarks/gpu_tests.sh 200 > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc " $OUT/gpu_tests.log | tail -20; grep -c PASSED $OUT/gpu_tests.log
