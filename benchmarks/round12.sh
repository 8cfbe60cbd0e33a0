#!/bin/bash
# the twelfth round's device call: the host-vector mode's Lanczos with its projection on a CPU thread beside
# the streamed HVP (linalg/delayed_host.py) on the 1B Llama under the default 1.5x plan, against the same run
# with the passes between the products, in one call; the loop's tests first. (The round's calls also compared
# host passes split by columns over single-threaded workers with the undivided ones, `host_lanczos.py --dim 2e8
# --threads 16 --dtypes bf16 --max-basis 8`; that split was removed, benchmarks/RESULTS.md section 6.)
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 100 python3 -m pytest -q -p no:randomly tests/test_delayed_host.py > $OUT/tests.log 2>&1
tail -n 2 $OUT/tests.log
run() {  # name, host loop on|off, cases, metric options, seconds
timeout "$5" python3 - "$1" "$2" "$3" "$4" <<'PY' >> $OUT/a.log 2>&1
import importlib, json, os, runpy, sys
name, mode, cases, opts = sys.argv[1:5]
L = importlib.import_module("geomprobe.linalg.lanczos")
timings = []
if mode == "off":
    L.delayed_host_due = lambda *a: False
else:
    # the host loop is opt-in: the spectrum metric asks for it here
    importlib.import_module("geomprobe.metrics.spectrum").delayed_fits = lambda land: "host"
    inner = L.run_delayed_host
    def wrapped(*a, **k):
        st = inner(*a, **k)
        timings.append(st.timing)
        json.dump(timings, open(os.environ["OUT"] + f"/{name}_timing.json", "w"))
        return st
    L.run_delayed_host = wrapped
sys.argv = ["benchmarks/scale.py", "models", "--cases", cases, "--metric-options", opts,
            "--out", os.environ["OUT"] + f"/{name}.json"]
runpy.run_path("benchmarks/scale.py", run_name="__main__")
PY
}
run llama_bf16_host on llama-1b:bf16:spectrum '{"spectrum":{"max_iter":12}}' 220
run llama_bf16_plain off llama-1b:bf16:spectrum '{"spectrum":{"max_iter":12}}' 200
rm -rf $OUT/run-* 2>/dev/null
ls $OUT
for f in $OUT/llama_bf16_host.json $OUT/llama_bf16_plain.json $OUT/gpt2_bf16_plan.json; do [ -f "$f" ] || continue; python3 -c "
import json; d=json.load(open('$f'))['results'][0]; m=d['metrics']['spectrum']; s=d['spectrum']
print('$f'.split('/')[-1], 'probe', round(d['probe_seconds'],1), 'hvps', d['probe_hvps'], 'hvp_s', round(d['probe_hvp_seconds'],1),
 'outside', round(m['outside_seconds'],1), round(m['outside_share'],3), 'peak', round(d['probe_over_train_peak'],3),
 'lmax', s['lambda_max'], s['lambda_max_err'], 'lmin', s['lambda_min'], s['lambda_min_err'], 'steps', s['steps'], s.get('reorth_regime'))
"; done
cat $OUT/*_timing.json 2>/dev/null; echo
grep -h "Error\|error" $OUT/a.log | grep -v transformers | tail -5 | cut -c1-300
