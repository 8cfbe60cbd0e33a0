#!/bin/bash
# round14.sh's two cases that ran past their limits, with room, and GPT-2 355M fp32 under the default plan again
# with the run's measured asymmetry recorded: its host-vector spectrum switched to whole-basis passes at step 6
# for "the matvec's asymmetry", where the resident fp32 GPT-2 124M runs stay in the estimated regime.
# About 8 minutes on one nvidia-h200.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
run 190 gpt2_355m_bf16_plan gpt2-355m:bf16:spectrum 30
run 190 llama_1b_bf16_ratio4 llama-1b:bf16:spectrum:4 30
run 150 gpt2_355m_fp32_plan_asym gpt2-355m:fp32:spectrum 8
summary
