#!/bin/bash
# One nvidia-h200 call (~5 minutes): the 1B Llama's fp32 spectrum under its default plan, which now chooses lean
# (a whole-basis pass no longer holds a fourth d-vector; the lean plan takes 1.5x the training peak whole), two
# probes, the later one profiled; then the GPU tests of the offloaded-basis paths by name.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
. benchmarks/device_cases.sh
S="benchmarks/scale.py --repeat 2 --profile 30" run 230 llama_1b_fp32_plan10 llama-1b:fp32:spectrum 10
summary
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob(__import__("os").environ["OUT"] + "/llama*.json")):
    r = json.load(open(f))["results"][0]
    print("plan peak GB", r["cost"]["memory_plan"]["peak_bytes"] / 1e9, "budget", r["cost"]["memory_plan"]["budget_bytes"] / 1e9,
          "allocated", r["cost"]["memory_plan"]["allocated_bytes"] / 1e9, "probe peak GB", r["probe_peak_bytes"] / 1e9,
          "train peak GB", r["train_peak_bytes"] / 1e9)
    for lp in r.get("later_probes", []):
        m = lp["metrics"]["spectrum"]
        print("later", round(lp["probe_seconds"], 1), "hvp", round(lp["probe_hvp_seconds"], 1), "metric",
              round(m["seconds"], 2), "outside", round(m["outside_seconds"], 2), round(m["outside_share"], 3),
              "peak_mib", lp["peak_mib"])
    for row in (r.get("later_profile") or {}).get("by_cumulative", [])[:30]:
        print(f'  own {row["own_s"]:7.3f} cum {row["cumulative_s"]:7.3f} {row["calls"]:6d} {row["function"][:90]}')
PY
bash benchmarks/gpu_tests.sh 100 tests/test_lean_lanczos.py tests/test_restarted_lanczos.py tests/test_capped_partial.py \
  tests/test_delayed_lanczos.py tests/test_ritz_rows.py tests/test_krylov_basis_memory.py > $OUT/gpu_tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed|rc |assert|Error" $OUT/gpu_tests.log | tail -10 | cut -c1-400
