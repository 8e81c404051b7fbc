#!/usr/bin/env bash
# A/B speed of this tree against another on one GPU, alternating (A B B A per shape), on one machine in one lease:
#   mkdir -p .ab/old && git archive <commit> src | tar -x -C .ab/old        # here, once; carry .ab and .whl
#   bash bench/ab.sh .ab/old/src                                           # on the GPU machine
# Shapes: the 70B widths x 20 layers and the 8B at 4 rows of 3072 tokens (2 on an 80 GB GPU), Liger, no recomputation (override with
# AB_SHAPES="llama3-8b ...", AB_STEPS=20 measured steps, AB_ORDER="other this this other"). `shardtune bench` JSON lines in $OUT/ab.jsonl (field "tree": this | other), a table
# at the end: tokens/s/GPU per run, the mean per tree, and their ratio.
set -uo pipefail
OTHER=${1:?usage: bash bench/ab.sh OTHER_SRC}
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
THIS_PATH=$PYTHONPATH OTHER_PATH=/tmp/site:$(cd "$OTHER" && pwd)
SHAPES=${AB_SHAPES:-llama3-70b-proxy llama3-8b}
# 4 rows of the 70B widths take 77 GiB without recomputation: 2 on an 80 GB card
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
MICRO=${AB_MICRO:-$([ "${MEM_MIB:-0}" -gt 100000 ] && echo 4 || echo 2)}
run() {  # tree shape
  local path=$THIS_PATH; [ "$1" = other ] && path=$OTHER_PATH
  echo "$(date +%T) $1 $2" >&2
  PYTHONPATH=$path python3 -m shardtune.cli bench "$2" --gpus 1 --seq 3072 --micro-batch "$MICRO" --warmup 3 --steps "${AB_STEPS:-8}" \
    --timeout 300 --out "$OUT/ab-$1.jsonl" --workdir "/tmp/ab-$1" model.fused_kernels=true \
    parallel.activation_checkpointing=false > /dev/null 2>> "$OUT/ab.err" || echo "FAILED $1 $2" >&2
  rm -rf "/tmp/ab-$1"
}
for shape in $SHAPES; do
  for tree in ${AB_ORDER:-this other other this}; do run "$tree" "$shape"; done
done
python3 - <<'PY'
import json, os, statistics as st
rows = {t: [json.loads(x) for x in open(os.environ["OUT"] + f"/ab-{t}.jsonl")] for t in ("this", "other")}
with open(os.environ["OUT"] + "/ab.jsonl", "w") as f:
    for t, rs in rows.items():
        for r in rs:
            f.write(json.dumps({"tree": t, **r}) + "\n")
print("| shape | this tree, tokens/s/GPU | other tree | this / other | peak GiB (this, other) |")
print("| --- | --- | --- | --- | --- |")
for shape in dict.fromkeys(r["shape"] for r in rows["this"]):
    a = [r for r in rows["this"] if r["shape"] == shape and "error" not in r]
    b = [r for r in rows["other"] if r["shape"] == shape and "error" not in r]
    ma, mb = st.mean(r["tokens_per_s_per_gpu"] for r in a), st.mean(r["tokens_per_s_per_gpu"] for r in b)
    each = lambda rs: " / ".join(f"{r['tokens_per_s_per_gpu']:,.0f}" for r in rs)
    peaks = f"{a[0]['gpu_peak_gib_per_rank'][0]:.2f}, {b[0]['gpu_peak_gib_per_rank'][0]:.2f}"
    print(f"| {shape} | {each(a)} (mean {ma:,.0f}) | {each(b)} (mean {mb:,.0f}) | {ma / mb:.4f} | {peaks} |")
PY
