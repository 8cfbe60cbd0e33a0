#!/bin/bash
# One nvidia-h200 call, about 9 minutes: the GPU tests of the files round33 found failing (float32 half-type
# block-diagonal updates, the classical first pass of an offloaded basis, the draw's one piece, torch's SDPA
# choice) and the lean Lanczos GPU test; then the 1B Llama's spectrum (10 steps, 1.5x plan, host vectors) with
# lean working vectors on the GPU: fp32 with page-locked and with pageable rows, bf16 (round33, host working
# vectors: fp32 78.2 s, 29.3 s outside); and GPT-2 124M bf16's default spectrum (its device-vector
# reorthogonalization takes the fixed block-diagonal update).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 120 python3 -m pytest -q -m gpu -p no:randomly tests/test_attndouble.py tests/test_blockdiag_update.py \
  tests/test_capped_partial.py tests/test_host_stream.py tests/test_segmented_products.py tests/test_lean_lanczos.py \
  tests/test_device_draw.py tests/test_ritz_rows.py > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?" >> $OUT/gpu_tests.log
grep -E "^(FAILED|ERROR)|passed|failed|rc " $OUT/gpu_tests.log | tail -15
. benchmarks/device_cases.sh
S="benchmarks/scale.py --working device" run 140 llama_1b_fp32_lean10 llama-1b:fp32:spectrum 10
run 80 gpt2_124m_bf16_spectrum gpt2-124m:bf16:spectrum 300
S="benchmarks/scale.py --working device" run 140 llama_1b_bf16_lean10 llama-1b:bf16:spectrum 10
S="benchmarks/scale.py --working device --pin off" run 140 llama_1b_fp32_lean10_pageable llama-1b:fp32:spectrum 10
summary
