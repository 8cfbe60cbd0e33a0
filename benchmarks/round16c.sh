#!/bin/bash
# One nvidia-h200 call, about 4 minutes: where the outside time of GPT-2 355M bf16's host-vector spectrum goes
# with the float32 host basis (round16b: its whole-basis passes grew ~0.3 s per row per step, ~10 GB/s, where the
# kernel benchmark found float32 rows at 75-95 GB/s), and the host Lanczos loop alone at d = 3.5e8 on that host
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 150 python3 benchmarks/scale.py models --cases gpt2-355m:bf16:spectrum --profile 40 \
  --metric-options '{"spectrum":{"max_iter":12}}' --out $OUT/prof_355m_bf16.json > $OUT/a.log 2>&1
echo "rc $?" >> $OUT/a.log
timeout 110 python3 benchmarks/host_lanczos.py --dim 3.5e8 --dtypes bf16w,bf16 --max-basis 16 --steps 16 \
  --skip-unbounded --skip-kernels --out $OUT/host_lanczos_355m.json > $OUT/b.log 2>&1
echo "rc $?" >> $OUT/b.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/prof_355m_bf16.json"))["results"][0]
print("probe", d.get("probe_seconds"), "hvp", d.get("probe_hvp_seconds"), "outside", d["metrics"]["spectrum"].get("outside_seconds"))
for r in d["profile"]["by_cumulative"][:40]: print("cum", r)
for r in d["profile"]["by_own"][:25]: print("own", r)
PY
grep -v "^    " $OUT/b.log | tail -8
