#!/bin/bash
# One nvidia-h200 call (~3.5 minutes, the session's last device time): the 1B Llama's fp32 spectrum under its
# default plan (lean), two probes, the later one profiled, after the lean run's Ritz vectors are formed whole on
# the device (divided there, copied out asynchronously) and its first probe no longer faults in host blocks it
# never uses; then the GPU tests of the Ritz and lean paths by name.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2 --profile 60" run 170 llama_1b_fp32_plan10_ritz llama-1b:fp32:spectrum 10
summary
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob(__import__("os").environ["OUT"] + "/llama*.json")):
    r = json.load(open(f))["results"][0]
    for lp in r.get("later_probes", []):
        m = lp["metrics"]["spectrum"]
        print("later", round(lp["probe_seconds"], 1), "hvp", round(lp["probe_hvp_seconds"], 1), "metric",
              round(m["seconds"], 2), "outside", round(m["outside_seconds"], 2), round(m["outside_share"], 3),
              "peak_mib", lp["peak_mib"])
    for row in (r.get("later_profile") or {}).get("by_cumulative", [])[:60]:
        if "ritz" in row["function"] or "lanczos" in row["function"] or "krylov" in row["function"]:
            print(f'  own {row["own_s"]:7.3f} cum {row["cumulative_s"]:7.3f} {row["calls"]:6d} {row["function"][:90]}')
PY
bash benchmarks/gpu_tests.sh 45 tests/test_ritz_rows.py tests/test_lean_lanczos.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert|Error" $OUT/gpu_tests.log | tail -10 | cut -c1-400
