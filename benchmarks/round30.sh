#!/bin/bash
# One nvidia-h200 call, about 5 minutes: the 1B Llama's spectrum (10 steps) in the host-vector mode with the
# Lanczos working vectors on the device and the basis in page-locked host memory (working_on_device.py), fp32
# and bf16, against round29's host working vectors (fp32 74.7 s, 30.7 s outside).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S=benchmarks/working_on_device.py run 200 llama_1b_fp32_working_device llama-1b:fp32:spectrum 10
S=benchmarks/working_on_device.py run 230 llama_1b_bf16_working_device llama-1b:bf16:spectrum 10
summary
