#!/bin/bash
# One nvidia-h200 call (~9.5 minutes): exact-size page-locked blocks (geomprobe/linalg/pinned_memory.py) against
# torch's power-of-two blocks, and what they change in the 1B Llama's fp32 spectrum, first and later probe.
# - benchmarks/pinned_alloc.py at a 1B float32 row (4.4 GB): cold / cached seconds, locked bytes, copy rates;
# - the GPU tests of the host-vector paths by name;
# - the lean spectrum, two probes (round37: 75.8 s then 25.7 s; round39: 83.6 s then 32.1 s);
# - the default plan, two probes (round39: 87.6 s then 71.7 s).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
timeout 70 python3 benchmarks/pinned_alloc.py --bytes 4.4e9 --out $OUT/pinned_alloc_h200.json > $OUT/pinned.log 2>&1
cat $OUT/pinned.log | cut -c1-400
bash benchmarks/gpu_tests.sh 100 tests/test_pinned_memory.py tests/test_lean_lanczos.py tests/test_host_stream.py \
  tests/test_restarted_lanczos.py tests/test_ritz_rows.py tests/test_capped_partial.py tests/test_device_draw.py \
  > $OUT/gpu_tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed|rc " $OUT/gpu_tests.log | tail -12
S="benchmarks/scale.py --working device --repeat 2" run 195 llama_1b_fp32_lean10_exact llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --repeat 2" run 200 llama_1b_fp32_host10_exact llama-1b:fp32:spectrum 10
summary
python3 benchmarks/later_summary.py
