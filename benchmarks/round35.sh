#!/bin/bash
# One nvidia-h200 call, about 8 minutes: the GPU tests after round33's fixes (float32 half-type block-diagonal
# updates, the classical first pass of an offloaded basis, the draw's one piece) and the new lean Lanczos test;
# then the 1B Llama's spectrum (10 steps, 1.5x plan, host vectors) with lean working vectors on the GPU, fp32 and
# bf16 (round33, host working vectors: fp32 78.2 s, 29.3 s outside), and GPT-2 124M bf16's default spectrum
# (its device-vector reorthogonalization takes the fixed block-diagonal update).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 170 python3 -m pytest -q -m gpu tests/ -p no:randomly > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc $?" >> $OUT/gpu_tests.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log | tail -15
. benchmarks/device_cases.sh
S="benchmarks/scale.py --working device" run 150 llama_1b_fp32_lean10 llama-1b:fp32:spectrum 10
run 100 gpt2_124m_bf16_spectrum gpt2-124m:bf16:spectrum 300
S="benchmarks/scale.py --working device" run 150 llama_1b_bf16_lean10 llama-1b:bf16:spectrum 10
summary
