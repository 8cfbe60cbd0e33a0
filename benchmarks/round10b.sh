#!/bin/bash
# the tenth round's second device call: warm starts moved on along a GPT-2 124M trajectory (residual bounds and
# certified, a probe every step and every 5), and the 1B Llama in host-vector mode with the host's cores split between the two jobs.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
S=benchmarks/scale.py
jobA() {
  export CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=12
  taskset -c 0-15 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 20 --every 1 --risk none \
    --out $OUT/traj_every1_residual.json > $OUT/a.log 2>&1
  taskset -c 0-15 python3 $S models --cases llama-1b:bf16:spectrum --metric-options '{"spectrum":{"max_iter":8}}' \
    --profile 30 --out $OUT/llama_host.json >> $OUT/a.log 2>&1
}
jobB() {
  export CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=12
  taskset -c 16-31 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 100 --every 5 --risk none \
    --out $OUT/traj_every5_residual.json > $OUT/b.log 2>&1
  taskset -c 16-31 python3 $S trajectory --model gpt2-124m --dtypes bf16 --steps 20 --every 1 \
    --out $OUT/traj_every1_certified.json >> $OUT/b.log 2>&1
}
jobA & jobB & wait
rm -rf $OUT/run-* 2>/dev/null
ls $OUT; grep -v "transformers\]" $OUT/a.log | tail -8 | cut -c1-400; grep -v "transformers\]" $OUT/b.log | tail -8 | cut -c1-400
