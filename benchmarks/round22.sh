#!/bin/bash
# One nvidia-h200 call, about 2.5 minutes: GPT-2 355M's default-plan spectra with the offloaded basis chosen by
# type (float32 rows pageable, each next row faulted in beside the product; bf16 rows page-locked), against
# round19 (all page-locked: fp32 38.6 s, 33.4 s in products) and round21 (pageable, faulted by the copies: fp32
# 40.7 s, 20.8 s in products, 18.5 s outside)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 75 gpt2_355m_fp32_plan12_auto gpt2-355m:fp32:spectrum 12
S="benchmarks/scale.py --pin off" run 60 gpt2_355m_bf16_plan10_pageable_populated gpt2-355m:bf16:spectrum 10
summary
