#!/bin/bash
# One nvidia-h200 call (~4 minutes): the 1B Llama's fp32 spectrum under its default plan (lean since round45), two
# probes, both profiled to 150 rows: where the first probe's 9.7 s and the later probe's 3.3 s outside the products
# go (the warm start's host arithmetic, the Ritz vectors, the step's reads of the previous row).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2 --profile 150" run 230 llama_1b_fp32_plan10_profile llama-1b:fp32:spectrum 10
summary
