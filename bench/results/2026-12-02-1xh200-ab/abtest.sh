#!/usr/bin/env bash
# A/B on one machine: the 70B widths x 20 layers, plain module, this tree vs 48d4a3e (old48/src), alternating.
# From the repository root, first: mkdir old48 && git archive 48d4a3e src | tar -x -C old48
# then (device tool, carrying .whl): bash bench/results/2026-12-02-1xh200-ab/abtest.sh
source bench/gpu_env.sh
HEADPP=$PYTHONPATH
for i in 1 2; do
  for v in head old; do
    if [ $v = old ]; then export PYTHONPATH=/tmp/site:$PWD/old48/src; else export PYTHONPATH=$HEADPP; fi
    echo "$(date +%T) $v $i" >&2
    python3 -m shardtune.cli bench llama3-70b-proxy --gpus 1 --seq 3072 --micro-batch 4 --warmup 3 --steps 10 \
      --timeout 300 --out $OUT/ab-$v.jsonl --workdir /tmp/ab-$v-$i model.fused_kernels=true \
      parallel.activation_checkpointing=false > /dev/null 2>> $OUT/ab.err || echo "FAILED $v $i" >&2
    mkdir -p $OUT/logs-$v-$i && cp /tmp/ab-$v-$i/*.log $OUT/logs-$v-$i/ 2>/dev/null; rm -rf /tmp/ab-$v-$i
  done
done
python3 - <<'PY'
import json, os
for v in ("head", "old"):
    for line in open(os.environ["OUT"] + f"/ab-{v}.jsonl"):
        r = json.loads(line)
        print(v, r.get("tokens_per_s_per_gpu"), r.get("mfu"), r.get("step_s"), r.get("gpu_peak_gib_per_rank"), r.get("loss_first_last"), r.get("step_s_each"))
PY
