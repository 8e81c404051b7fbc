#!/usr/bin/env bash
# GPU call 1 (2026-12-07): issue 27 (doctor --numerics), 29 (paged, 8-bit), 28 (DPO GPU test, dpo_vs_trl)
set -uo pipefail
source bench/gpu_env.sh
export HF_HUB_OFFLINE=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
N=(recipes/tiny.py --numerics --force-sharding model.name_or_path=llama3-8b parallel.mixed_precision=bf16)
timeout 150 python3 -m shardtune.cli doctor "${N[@]}" > $OUT/numerics.log 2>&1; el "numerics rc=$?"
SHARDTUNE_NUMERICS_FAULT=fsdp-bf16-buffers timeout 120 python3 -m shardtune.cli doctor "${N[@]}" > $OUT/numerics_fault.log 2>&1; el "numerics fault rc=$?"
timeout 220 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu -k "paged or 8bit or reference" > $OUT/gpu_tests.log 2>&1; el "gpu tests rc=$?"
timeout $(( 570 - ($(date +%s) - T0) )) python3 bench/dpo_vs_trl.py > $OUT/dpo_vs_trl.jsonl 2> $OUT/dpo_vs_trl.err; el "dpo_vs_trl rc=$?"
tail -25 $OUT/numerics.log; tail -12 $OUT/numerics_fault.log; tail -15 $OUT/gpu_tests.log; tail -5 $OUT/dpo_vs_trl.err; cat $OUT/dpo_vs_trl.jsonl
