#!/bin/bash
# One nvidia-h200 call (~4 minutes): the 1B Llama's lean fp32 spectrum, one probe, its device allocations traced
# whole (3M events) to find the phase of its peak: 17.66 GB above the probe's start, four d-vectors' worth, while
# a product holds the two working vectors and 6.85 GB (round43), 15.68 GB.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --working device --memory-history" run 300 llama_1b_fp32_lean10_trace llama-1b:fp32:spectrum 10
summary
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob(__import__("os").environ["OUT"] + "/llama*.json")):
    r = json.load(open(f))["results"][0]
    h = r.get("memory_at_peak")
    if h:
        print({k: v for k, v in h.items() if k != "at_peak"})
        for row in h["at_peak"][:20]:
            print(f'  {row["bytes"] / 2**30:7.3f} GiB {row["blocks"]:5d}  {row["where"][:300]}')
PY
