#!/bin/bash
# Prepared for the next device call (not run yet), about 7 minutes on one nvidia-h200: GPT-2 355M's default-plan
# spectra, two probes each in one process with a training step between (scale.py --repeat 2): the second probe
# is the steady state of a probe in a loop (page-locked blocks cached by torch, the spectrum warm-started from
# the first probe's Ritz vectors). Fifteenth round, first probes: fp32 12 steps 38.6 s, 10.4 % outside (2.4 s of
# its 3.9 s the warm-start Ritz vectors); bf16 10 steps 24.0 s, 11.6 %. Run with the Ritz vectors written into the
# spent basis's page-locked rows (LanczosResult.take_ritz_vectors) and kept without copies by the warm start.
# Limits allow ~40 s of model set-up.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2" run 190 gpt2_355m_fp32_plan12_repeat gpt2-355m:fp32:spectrum 12
S="benchmarks/scale.py --repeat 2" run 160 gpt2_355m_bf16_plan10_repeat gpt2-355m:bf16:spectrum 10
grep -h '"later_probe"' $OUT/a.log | cut -c1-400
summary
