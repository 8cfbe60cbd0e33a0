#!/bin/bash
# Every GPU test (`-m gpu`) with its name and outcome, within a limit (default 170 s; the whole set took ~140 s on
# an H200 in round33). -v names each test as it ends, so a run cut by its limit still says which passed.
# Usage on the device: bash benchmarks/gpu_tests.sh [LIMIT_SECONDS] [PYTEST_ARGS...]
set -u
limit=${1:-170}
shift || true
timeout "$limit" python3 -m pytest -v -rfE --tb=line -m gpu -p no:randomly "${@:-tests/}" 2>&1 \
  | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error|Error|assert" | sed 's/ *\[ *[0-9]*%\]//' | cut -c1-400
echo "gpu tests rc ${PIPESTATUS[0]}"
