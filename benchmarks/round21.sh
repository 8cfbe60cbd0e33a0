#!/bin/bash
# One nvidia-h200 call, about 4 minutes: GPT-2 355M's default-plan spectra (device vectors, every graph rebuilt,
# basis offloaded to host memory) with the basis in pageable host memory (--pin off) instead of page-locked
# blocks allocated one ahead on another thread (0.69 s/GB: 12.8 s for fp32's 18.5 GB, beside the products).
# Compare with round19 (same code, pinned): fp32 12 steps 38.6 s (33.4 s in products), bf16 10 steps 24.0 s.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --pin off" run 90 gpt2_355m_fp32_plan12_pageable gpt2-355m:fp32:spectrum 12
S="benchmarks/scale.py --pin off" run 80 gpt2_355m_bf16_plan10_pageable gpt2-355m:bf16:spectrum 10
summary
