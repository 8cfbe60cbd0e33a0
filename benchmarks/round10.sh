#!/bin/bash
# the tenth round's first device call: the full set with pruned column HVPs (GPU 0); pruned against unpruned
# column chunks and rmed, where a resident Lanczos step spends its time, fp32 spectrum with the product's
# rounding injected (GPU 1). Threads split so the two jobs do not oversubscribe the host.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
jobA() {
  export CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=12
  taskset -c 0-15 python3 $S models --cases gpt2-124m:bf16:spectrum+trace+density+rmed+diagshare+noise+precond:100 \
    --out $OUT/full_set.json > $OUT/a.log 2>&1
}
jobB() {
  export CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=12
  taskset -c 16-31 python3 benchmarks/pruned_hvp.py --models gpt2-124m --dtype bf16 --positions 12 --repeats 3 \
    --rmed-hvps 1024 --out $OUT/pruned_hvp.json > $OUT/b.log 2>&1
  taskset -c 16-31 python3 benchmarks/profile_lanczos_step.py --case gpt2-124m:bf16 --steps 60 \
    --out $OUT/profile_step.json >> $OUT/b.log 2>&1
  taskset -c 16-31 python3 $S models --cases gpt2-124m:fp32:spectrum:100 --out $OUT/spec_fp32.json >> $OUT/b.log 2>&1
}
jobA & jobB & wait
rm -rf $OUT/run-* 2>/dev/null
tail -3 $OUT/a.log; grep -v "transformers\]" $OUT/b.log | tail -60
