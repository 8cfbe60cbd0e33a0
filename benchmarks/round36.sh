#!/bin/bash
# One short nvidia-h200 call: the GPU tests round33 found failing, by name (round35's run of them was cut at its
# limit with no failure among the 47 it finished, but -q named none), and the new lean and draw GPU tests.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 100 python3 -m pytest -v -m gpu -p no:randomly tests/test_capped_partial.py tests/test_lean_lanczos.py \
  tests/test_device_draw.py "tests/test_host_stream.py::test_on_a_gpu_host_vectors_cross_the_bus_and_hold_no_d_vector" \
  "tests/test_attndouble.py::test_cuda_matches_the_math_kernel" tests/test_blockdiag_update.py \
  "tests/test_segmented_products.py::test_cuda_products_match_float64" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | cut -c1-160
