#!/bin/bash
# One nvidia-h200 call, about 3.5 minutes: where the 3.9 s outside the products of GPT-2 355M fp32's default-plan
# spectrum (12 steps, estimated regime, no whole-basis pass) and the 2.7 s of bf16's (10 steps) go: cProfile rows
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
for c in fp32:12 bf16:10; do
  d=${c%%:*}; n=${c##*:}
  timeout 100 python3 $S models --cases gpt2-355m:$d:spectrum --metric-options "{\"spectrum\":{\"max_iter\":$n}}" \
    --profile 45 --out $OUT/prof_355m_$d.json >> $OUT/a.log 2>&1
  echo "end $d rc $?" >> $OUT/a.log
done
python3 - <<'PY'
import json, os
for d in ("fp32", "bf16"):
    f = os.path.join(os.environ["OUT"], f"prof_355m_{d}.json")
    if not os.path.exists(f): print(d, "missing"); continue
    r = json.load(open(f))["results"][0]
    print(d, "probe", round(r["probe_seconds"], 1), "hvp", round(r["probe_hvp_seconds"], 1), "outside", round(r["metrics"]["spectrum"]["outside_seconds"], 2))
    prof = r.get("profile") or {}
    for key in ("by_cumulative", "by_own"):
        print(" ", key)
        for row in prof.get(key, [])[:45]:
            print("   ", row["function"][:90], row["calls"], row["own_s"], row["cumulative_s"])
PY
tail -3 $OUT/a.log
