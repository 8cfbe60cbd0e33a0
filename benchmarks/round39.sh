#!/bin/bash
# One nvidia-h200 call (~9.5 minutes): where a later probe of the 1B Llama's fp32 spectrum spends its time outside
# the products, and whether the host passes can go faster.
# - the host pass of a three-term step at d = 5e8 fp32 on the device's host: torch threads on each chunk against
#   column spans on Python threads (benchmarks/host_pass_threads.py);
# - the default plan (host vectors), two probes in one process, each under cProfile (the second is the steady
#   state of a probe in a training loop: the Landscape's buffers and torch's pinned cache are warm);
# - the lean run likewise (round37: 75.8 s then 25.7 s, 25.7 % outside in the second).
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
timeout 110 python3 benchmarks/host_pass_threads.py --dim 5e8 --threads 16,8,1 --workers 1,4,8,16 --repeats 2 \
  --out $OUT/host_pass_threads_h200.json > $OUT/host_pass.log 2>&1; tail -14 $OUT/host_pass.log
S="benchmarks/scale.py --profile 40 --repeat 2" run 240 llama_1b_fp32_host10_repeat llama-1b:fp32:spectrum 10
S="benchmarks/scale.py --profile 40 --working device --repeat 2" run 210 llama_1b_fp32_lean10_repeat_profile llama-1b:fp32:spectrum 10
summary
