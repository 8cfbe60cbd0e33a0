#!/bin/bash
# One nvidia-h200 call, about 6 minutes: the 1B Llama's fp32 spectrum on host vectors (10 steps) with the start
# drawn on the GPU (krylov_basis.start_basis) and the steps' update deferred to the row's pass
# (krylov_basis.DEFER_UPDATE), then the same with the update applied at once (--defer off); round29: 74.7 s,
# 30.7 s outside, with neither. (The deferred update and scale.py's --defer were taken out after this run:
# no faster on the device, benchmarks/host_step_passes.py. The start was in fact drawn on the CPU in both cases:
# the probe's spectrum call did not pass draw_device yet.)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 200 llama_1b_fp32_plan10_deferred llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --defer off" run 200 llama_1b_fp32_plan10_applied llama-1b:fp32:spectrum 10
summary
