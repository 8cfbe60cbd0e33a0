#!/bin/bash
# One nvidia-h200 call, about 5 minutes: where the 1B Llama's fp32 spectrum on host vectors spends its 62 s
# outside the products (sixteenth round: 116.1 s, 56.6 % outside with no whole-basis pass), profiled
# (cProfile of the main thread, scale.py --profile), and the host's huge-page settings.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
{ cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; grep -E "MemTotal|MemAvailable" /proc/meminfo; cat /sys/fs/cgroup/memory.max 2>/dev/null; } >> $OUT/a.log 2>&1
S="benchmarks/scale.py --profile 60" run 290 llama_1b_fp32_plan10_profile llama-1b:fp32:spectrum 10
summary
