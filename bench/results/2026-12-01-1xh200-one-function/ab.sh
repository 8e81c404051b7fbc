#!/usr/bin/env bash
# A/B on one GPU, run from the repository root: this tree's fused_lora/nf4/lora_kernel (new) against ab_old/, the
# same files from commit 5fa11f8 (for f in fused_lora nf4 lora_kernel; do git show 5fa11f8:src/shardtune/$f.py > ab_old/$f.py; done),
# interleaved: new, old, new, old on the 80-layer 70B, then both on the 70B widths
set -u
source bench/gpu_env.sh
timeout 200 python3 -m pytest -q -s tests/gpu -k levers -p no:cacheprovider > $OUT/test_gpu_levers.log 2>&1
tail -1 $OUT/test_gpu_levers.log
mkdir -p ab_new && cp src/shardtune/{fused_lora,nf4,lora_kernel}.py ab_new/
O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true parallel.activation_checkpointing=false --timeout 240 --workdir /tmp/bench)
run() {  # version, shape, extra
  cp ab_$1/*.py src/shardtune/
  echo "$(date +%T) $*"
  python3 -m shardtune.cli bench $2 "${O[@]}" ${3:-} --out $OUT/ab_$1.jsonl > /dev/null 2>> $OUT/err.log || echo FAILED
  rm -rf /tmp/bench/*-gpu-*/; mkdir -p $OUT/logs; mv /tmp/bench/*.log $OUT/logs/ 2>/dev/null
}
for round in 1 2; do run new llama3-70b; run old llama3-70b; done
run new llama3-70b-proxy "--micro-batch 4"; run old llama3-70b-proxy "--micro-batch 4"
cp ab_new/*.py src/shardtune/
for v in new old; do python3 - $OUT/ab_$v.jsonl $v <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "error" in r: print(sys.argv[2], r["shape"], "ERROR", r["error"][:300]); continue
    print(f"{sys.argv[2]} {r['shape']:<17} mb{r['micro_batch']} {r['tokens_per_s_per_gpu']:>8,.0f} {r['mfu']:.1%} {max(r['gpu_peak_gib_per_rank']):.1f}GiB {r['step_s_each']}")
PY
done
