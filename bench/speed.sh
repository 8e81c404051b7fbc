#!/usr/bin/env bash
# Throughput runs for BENCHMARKS.md on a 2-GPU machine: `shardtune bench`, one JSON line per run in
# $OUT/speed.jsonl, a table at the end. Groups run in the order given:
#   bash bench/speed.sh 8b proxy 70b varlen
#   bash bench/speed.sh peers      (one GPU: bench/peers/peers.py beside Unsloth and TRL + PEFT)
#   bash bench/speed.sh offload1   (one GPU: activation offloading against recomputation)
#   bash bench/speed.sh mix1       (one GPU, 80-layer 70B: auto's mix of offloading and recomputing against all recomputed)
set -uo pipefail
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
LOG=$OUT/speed.jsonl
NOAC=parallel.activation_checkpointing=false
# the 80-layer target row's settings (3 warm-up steps: on a fresh machine Triton compiles its kernels into the
# first steps; a fresh 8B run's third step was still at half speed: bench/results/2026-12-01-1xh200-varlen/fixed)
L70=(llama3-70b --gpus 2 --seq 3072 --warmup 3 --steps 3 model.fused_kernels=true "$NOAC")

bench() {  # shape, then bench options and overrides
  echo "$(date +%T) bench $*" >&2
  python3 -m shardtune.cli bench "$@" --timeout 300 --out "$LOG" --workdir /tmp/bench > /dev/null 2>> "$OUT/speed.err" \
    || { echo "FAILED: bench $*" >&2; tail -3 "$LOG" | cut -c1-2000 >&2; }
  rm -rf /tmp/bench/*-gpu-*/  # run directories (checkpoints)
  mkdir -p "$OUT/logs" && mv /tmp/bench/*.log "$OUT/logs/" 2>/dev/null
}

for group in "$@"; do
  case $group in
    8b)  # the published recipe's settings first (fp32 adapters = PEFT's default, checkpointing), then each lever
      bench llama3-8b --gpus 2 --seq 3072 lora.compute_dtype=float32
      bench llama3-8b --gpus 2 --seq 3072
      bench llama3-8b --gpus 2 --seq 3072 $NOAC
      bench llama3-8b --gpus 2 --seq 3072 --micro-batch 2 $NOAC
      bench llama3-8b --gpus 2 --seq 3072 --micro-batch 2 $NOAC model.fused_kernels=true
      bench llama3-8b --gpus 2 --seq 3072 --micro-batch 4 $NOAC model.fused_kernels=true ;;
    8b1)  # one GPU, for the scaling figure
      bench llama3-8b --gpus 1 --seq 3072 --micro-batch 2 $NOAC model.fused_kernels=true ;;
    proxy)  # Llama-3-70B widths, 20 layers
      P=(llama3-70b-proxy --gpus 2 --seq 3072 --warmup 2 --steps 3)
      bench "${P[@]}" lora.compute_dtype=float32
      bench "${P[@]}" --micro-batch 2 $NOAC model.fused_kernels=true
      bench "${P[@]}" --micro-batch 4 $NOAC model.fused_kernels=true ;;
    70b)  # the full 80 layers: checkpointing chosen from memory
      bench llama3-70b --gpus 2 --seq 3072 --warmup 2 --steps 3 --micro-batch 2 model.fused_kernels=true \
        parallel.activation_checkpointing=auto ;;
    70b1)  # the full 80 layers, one row per GPU: no recomputation (it fits an H200), then what auto picks
      bench llama3-70b --gpus 2 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true $NOAC
      bench llama3-70b --gpus 2 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true \
        parallel.activation_checkpointing=auto ;;
    targets)  # the three target rows, fastest settings (lora.fused is the default), most wanted first: the 80-layer
      # 70B with its 4-bit base whole on each GPU (35 GiB fits an H200 beside one row: no all-gathers), then sharded.
      bench "${L70[@]}" parallel.sharding_strategy=NO_SHARD
      bench llama3-70b-proxy --gpus 2 --seq 3072 --warmup 3 --steps 3 --micro-batch 4 $NOAC model.fused_kernels=true
      bench llama3-8b --gpus 2 --seq 3072 --warmup 3 --micro-batch 4 $NOAC model.fused_kernels=true
      bench "${L70[@]}"
      bench "${L70[@]}" parallel.sharding_strategy=NO_SHARD lora.dropout=0 ;;  # the same without LoRA dropout
    target70)  # the 80-layer target row alone (the one not met yet): sharding as 2xh100.yaml's auto picks it
      # (NO_SHARD is planned: the "auto=" column of the table says), then FULL_SHARD; ~3 minutes
      bench "${L70[@]}" parallel.sharding_strategy=auto
      bench "${L70[@]}" ;;
    noshard1)  # one GPU, the 80-layer target row: the plain module, then FSDP forced on with NO_SHARD (all of a
      # 2-GPU NO_SHARD rank's work but the adapters' all-reduce; bench/fsdp_one_gpu.py), over 38 steps (3 were too
      # few: one slower step moved the mean by 4%), then the same for the proxy; ~7 minutes
      for shape in "llama3-70b --warmup 2 --steps 38" "llama3-70b-proxy --micro-batch 4 --warmup 3 --steps 3"; do
        echo "$(date +%T) fsdp_one_gpu $shape" >&2
        # shellcheck disable=SC2086
        python3 bench/fsdp_one_gpu.py $shape --seq 3072 --workdir /tmp/bench model.fused_kernels=true \
          $NOAC parallel.sharding_strategy=NO_SHARD >> "$LOG" 2>> "$OUT/speed.err" || echo "FAILED: fsdp_one_gpu $shape" >&2
        for run in plain forced; do  # the two logs have the same name
          mkdir -p "$OUT/logs/${shape%% *}/$run" && mv /tmp/bench/$run/*.log "$OUT/logs/${shape%% *}/$run/" 2>/dev/null
        done
        rm -rf /tmp/bench/{plain,forced}
      done ;;
    one)  # one GPU (when no 2-GPU machine is lent): proxy and 8B at micro-batch 4 without and with selective
      # recomputation, the 80-layer 70B at 1 (selective) and at 2 (what auto picks)
      O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true)
      SEL=parallel.activation_checkpointing=selective
      bench llama3-70b-proxy "${O[@]}" --micro-batch 4 $NOAC
      bench llama3-70b-proxy "${O[@]}" --micro-batch 4 $SEL
      bench llama3-8b "${O[@]}" --micro-batch 4 $NOAC
      bench llama3-8b "${O[@]}" --micro-batch 4 $SEL
      bench llama3-70b "${O[@]}" $SEL
      bench llama3-70b "${O[@]}" --micro-batch 2 parallel.activation_checkpointing=auto ;;
    targets1)  # the three target shapes on one GPU, fastest settings that fit one H200
      O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true)
      bench llama3-70b-proxy "${O[@]}" --micro-batch 4 $NOAC
      bench llama3-8b "${O[@]}" --micro-batch 4 $NOAC
      bench llama3-70b "${O[@]}" parallel.activation_checkpointing=selective ;;
    kernel1)  # one GPU, the LoRA dropout kernel on (lora_kernel.py): the three target shapes without recomputation
      # (the 80-layer 70B fits one H200 so), then the 80-layer 70B without dropout, the kernel's ceiling
      O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true $NOAC)
      bench llama3-70b-proxy "${O[@]}" --micro-batch 4
      bench llama3-8b "${O[@]}" --micro-batch 4
      bench llama3-70b "${O[@]}"
      bench llama3-70b "${O[@]}" lora.dropout=0 ;;
    fsdp)  # FSDP's settings, each on and off against the defaults (first row; 70B widths, micro-batch 4): forward
      # prefetch, backward prefetch none / after the gradient, and the 4-bit base whole on each GPU (no all-gathers)
      F=(llama3-70b-proxy --gpus 2 --seq 3072 --warmup 2 --steps 3 --micro-batch 4 $NOAC model.fused_kernels=true)
      bench "${F[@]}"
      bench "${F[@]}" parallel.forward_prefetch=true
      bench "${F[@]}" parallel.backward_prefetch=NO_PREFETCH
      bench "${F[@]}" parallel.backward_prefetch=BACKWARD_POST
      bench "${F[@]}" parallel.sharding_strategy=NO_SHARD ;;
    dropout)  # LoRA dropout 0.05 (the published recipe's, above) vs none
      bench llama3-70b-proxy --gpus 2 --seq 3072 --warmup 2 --steps 3 --micro-batch 4 $NOAC model.fused_kernels=true \
        lora.dropout=0 ;;
    plan)  # for shardtune plan's table: a second and third sequence length, and CPU offload on/off under a 24 GiB cap
      bench llama3-8b --gpus 2 --seq 2048 --micro-batch 2 $NOAC
      bench llama3-8b --gpus 2 --seq 4096 --micro-batch 1
      bench llama3-70b-proxy --gpus 2 --seq 2048 --micro-batch 2 $NOAC
      bench llama3-70b --gpus 2 --seq 3072 --warmup 1 --steps 2 parallel.gpu_memory_limit_gib=24 parallel.cpu_offload=true
      bench llama3-70b --gpus 2 --seq 3072 --warmup 1 --steps 2 parallel.gpu_memory_limit_gib=24 ;;  # expected not to fit
    varlen)  # instruction-like lengths (tens to thousands of tokens), 8 rows per GPU per step: padded vs packed
      V=(llama3-8b --gpus 2 --seq 3072 --micro-batch 8 --lengths instruct model.fused_kernels=true
         parallel.activation_checkpointing=auto)
      bench "${V[@]}"
      bench "${V[@]}" data.packing=true ;;
    tokens1)  # one GPU, instruction-length rows packed, 32 per step: micro-batches of 8 rows vs of a token budget
      T=(llama3-8b --gpus 1 --seq 3072 --micro-batch 32 --lengths instruct --warmup 3 --steps 12
         model.fused_kernels=true parallel.activation_checkpointing=auto data.packing=true)
      bench "${T[@]}" train.micro_batch_size=8
      bench "${T[@]}" train.micro_batch_tokens=8192
      bench "${T[@]}" train.micro_batch_tokens=16384 ;;
    tokens70)  # the same rows on the 70B widths x 20 layers: 8 rows vs a 12,288-token budget
      T=(llama3-70b-proxy --gpus 1 --seq 3072 --micro-batch 32 --lengths instruct --warmup 3 --steps 8
         model.fused_kernels=true parallel.activation_checkpointing=auto data.packing=true)
      bench "${T[@]}" train.micro_batch_size=8
      bench "${T[@]}" train.micro_batch_tokens=12288 ;;
    varlen1)  # the same on one GPU, over 20 measured steps (each padded step has a length of its own)
      V=(llama3-8b --gpus 1 --seq 3072 --micro-batch 8 --lengths instruct --warmup 3 --steps 20
         model.fused_kernels=true parallel.activation_checkpointing=auto)
      bench "${V[@]}"
      bench "${V[@]}" data.packing=true ;;
    offload1)  # one GPU: activation offloading (parallel.activation_checkpointing=offload) against recomputing the
      # same layers: 8B at micro-batch 4, the 70B widths at 1; every layer, then every 2nd offloaded
      O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true)
      AC=parallel.activation_checkpointing
      bench llama3-8b --micro-batch 4 "${O[@]}" $AC=true
      bench llama3-8b --micro-batch 4 "${O[@]}" $AC=offload
      bench llama3-70b-proxy "${O[@]}" $AC=true
      bench llama3-70b-proxy "${O[@]}" $AC=offload
      bench llama3-8b --micro-batch 4 "${O[@]}" $AC=offload parallel.checkpoint_every=2
      bench llama3-70b-proxy "${O[@]}" $AC=offload parallel.checkpoint_every=2 ;;
    mix1)  # one GPU, the whole 80-layer 70B: auto (planned: a mix, orokk) against recomputing every layer (1,244
      # tokens/s on an H100 when issue 26 was filed)
      O=(--gpus 1 --seq 3072 --warmup 2 --steps 3 model.fused_kernels=true)
      bench llama3-70b "${O[@]}" parallel.activation_checkpointing=auto
      bench llama3-70b "${O[@]}" parallel.activation_checkpointing=true ;;
    peers)  # one GPU: shardtune, Unsloth, TRL + PEFT on the same checkpoint and rows; a table per shape
      bash bench/peers/unsloth_env.sh
      python3 bench/peers/peers.py --shape llama3-8b --out "$OUT"
      python3 bench/peers/peers.py --shape llama3-70b-proxy --out "$OUT" ;;
  esac
done
echo; echo "=== $LOG"
python3 - "$LOG" <<'PY'
import json, sys
print(f"{'shape':<17}{'gpus':>4}{'mb':>4} {'lengths':<9}{'tok/s/GPU':>10}{'MFU':>7}{'HFU':>7}{'peak GiB':>9}{'retries':>8}  overrides")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['shape']:<17}{r['gpus']:>4}{r['micro_batch']:>4} {r['lengths']:<9} ERROR {r['error']}  {' '.join(r['overrides'])}")
        continue
    peak = max(x for x in r["gpu_peak_gib_per_rank"] if x is not None)
    print(f"{r['shape']:<17}{r['gpus']:>4}{r['micro_batch']:>4} {r['lengths']:<9}{r['tokens_per_s_per_gpu']:>10,.0f}"
          f"{r['mfu']:>7.1%}{r['hfu']:>7.1%}{peak:>9.1f}{r.get('alloc_retries') or 0:>8}  {' '.join(r['overrides'])}"
          + (f"  [FSDP forced: {r['fsdp_units']} units {r['fsdp_strategy']}]" if r.get("fsdp_forced") else "")
          + (f"  auto={r['settings']['sharding_strategy']}" if "parallel.sharding_strategy=auto" in r["overrides"] else "")
          + f"  loss {r['loss_first_last'][0]:.6f}")
PY
