#!/bin/bash
# One nvidia-h200 call, about 6 minutes: the GPU tests (never run: the offloaded capped-restart test and the
# device draw's CUDA test), then the 1B Llama's fp32 spectrum on host vectors (10 steps) with the start drawn
# on the GPU in the probe's warm-start route too (round32 drew it on the CPU: 26.1 s steps 5-10; round29 74.7 s,
# 30.7 s outside).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/ -p no:randomly > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?" >> $OUT/gpu_tests.log
timeout 60 python3 -m pytest -q tests/test_device_draw.py -p no:randomly > $OUT/draw_tests.log 2>&1; echo "draw tests rc $?" >> $OUT/draw_tests.log
tail -15 $OUT/gpu_tests.log; tail -4 $OUT/draw_tests.log
. benchmarks/device_cases.sh
run 220 llama_1b_fp32_plan10_gpudraw llama-1b:fp32:spectrum 10
summary
