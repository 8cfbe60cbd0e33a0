#!/bin/bash
# One nvidia-h200 call, about 4 minutes: the 1B Llama's fp32 spectrum on host vectors (10 steps) with the
# Ritz vectors' host targets faulted in beside the run (host_blocks.populated_ahead); sixteenth round: 116.1 s,
# 62.0 s outside, 7.2 s of it the Ritz vectors written into fresh host memory.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 300 llama_1b_fp32_plan10_populated llama-1b:fp32:spectrum 10
summary
