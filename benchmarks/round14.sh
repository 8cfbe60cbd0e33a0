#!/bin/bash
# The default-plan spectra whose outside share was not measured since the delayed loop (round13.sh's first
# three cases ran past limits set for fewer steps), and the 1B Llama in bf16 with the vectors on the device
# (peak ratio 4: the basis offloaded, the delayed loop's passes beside the products) against its host-vector
# default. Each case in its own process and limit, so the earlier ones come back if a later one runs over.
# About 9 minutes on one nvidia-h200.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 150 gpt2_124m_fp32_plan gpt2-124m:fp32:spectrum 40
run 130 gpt2_355m_bf16_plan gpt2-355m:bf16:spectrum 30
run 150 gpt2_355m_fp32_plan gpt2-355m:fp32:spectrum 16
run 120 llama_1b_bf16_ratio4 llama-1b:bf16:spectrum:4 40
summary
