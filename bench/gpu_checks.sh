#!/usr/bin/env bash
# GPU checks for the "70B on real GPUs" work, run on a 2-GPU machine (recorded in bench/results/).
#   bash bench/gpu_checks.sh exact train70b capped70b     # any subset, in order
# Needs the wheels the GPU image lacks in .whl/ (see ../shared/tools/gpu_wheels.sh); logs go to $OUT.
set -uo pipefail
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
RESULTS=$OUT/results.jsonl

# The checks verify the sharded path (as recorded in bench/results): FULL_SHARD pinned where 2xh100.yaml says auto
# (which keeps the base whole on each GPU where it fits).
TRAIN70=(model.name_or_path=llama3-70b model.init=random data.source=/tmp/rows.jsonl data.format=text data.max_len=2048
         data.test_size=4 train.max_steps=20 train.global_batch_size=2 train.micro_batch_size=1 eval.every=0
         eval.samples=0 eval.max_rows=4 train.save_every=0 train.log_every=1 parallel.sharding_strategy=FULL_SHARD)

summarize() {  # $1 = name, $2 = run dir: one JSON line with the run's numbers (steps after the first 3)
  python3 - "$1" "$2" >> "$RESULTS" <<'PY'
import json, sys, statistics as st
name, run = sys.argv[1], sys.argv[2]
s = json.load(open(f"{run}/summary.json"))
steps = [json.loads(x) for x in open(f"{run}/metrics.jsonl") if '"tokens_per_s_per_device"' in x]
steady = steps[3:] or steps
print(json.dumps({"check": name, "tokens_per_s_per_gpu": st.mean(m["tokens_per_s_per_device"] for m in steady),
  "mfu": st.mean(m["mfu"] for m in steady), "step_s": st.mean(m["step_time_s"] for m in steady),
  "gpu_peak_gib_per_rank": s["gpu_peak_gib_per_rank"], "host_peak_gib_per_rank": s["host_peak_gib_per_rank"],
  "load_s": s["load_s"], "load_host_gib_over_start": s["load_host_peak_gib"], "first_loss": steps[0]["loss"],
  "last_loss": steps[-1]["loss"], "steps": len(steps), "world_size": s.get("world_size")}))
PY
}

compare_losses() {  # $1 = name, $2 $3 = run dirs: per-step loss differences
  python3 - "$@" >> "$RESULTS" <<'PY'
import json, sys
name, runs = sys.argv[1], sys.argv[2:]
a, b = ([json.loads(x)["loss"] for x in open(f"{r}/metrics.jsonl") if '"tokens_per_s_per_device"' in x] for r in runs)
print(json.dumps({"check": name, "steps": len(a), "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
                  "max_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(a, b)), "loss_a": a, "loss_b": b}))
PY
}

checkpoint_times() {  # $1 = name, $2 = run dir, $3... = logs: checkpoint size, save and load times
  python3 - "$@" >> "$RESULTS" <<'PY'
import json, re, subprocess, sys
name, run, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
text = "".join(open(f).read() for f in logs)
saves = re.findall(r"saved to \S+ \(([\d.]+) MiB\) in ([\d.]+)s", text)
loads = re.findall(r"loaded in ([\d.]+)s", text)
du = subprocess.run(["du", "-sh", f"{run}/checkpoints"], capture_output=True, text=True).stdout.split()
print(json.dumps({"check": name, "checkpoint_mib": float(saves[0][0]) if saves else None,
                  "save_s": [float(s[1]) for s in saves], "load_s": [float(x) for x in loads],
                  "checkpoints_dir": du[0] if du else None}))
PY
}

for check in "$@"; do
  case $check in
    exact)
      for shape in "llama3-8b" "llama3-70b model.shape.num_hidden_layers=20" \
        "llama3-70b model.shape.num_hidden_layers=20 parallel.sharding_strategy=NO_SHARD"; do
        # shellcheck disable=SC2086
        python3 -m torch.distributed.run --nproc_per_node 2 tests/workers/gpu_exact.py $shape 2>"$OUT/exact.err" \
          | grep '^{' | sed 's/^{/{"check": "exact", /' >> "$RESULTS" || tail -30 "$OUT/exact.err"
      done ;;
    train70b)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_70b.py \
        "${TRAIN70[@]}" train.output_dir=/tmp/runs train.run_name=train70b > "$OUT/train70b.log" 2>&1 \
        && summarize train70b-80layers-seq2048 /tmp/runs/train70b || tail -40 "$OUT/train70b.log" ;;
    capped70b)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_70b.py \
        "${TRAIN70[@]}" parallel.cpu_offload=true parallel.gpu_memory_limit_gib=24 \
        train.output_dir=/tmp/runs train.run_name=capped70b > "$OUT/capped70b.log" 2>&1 \
        && summarize capped24GiB-offload-70b-80layers /tmp/runs/capped70b || tail -40 "$OUT/capped70b.log" ;;
    ckpt8b)  # a real local checkpoint: stream-load it on 2 GPUs, train; 1 GPU for comparison; reload; published loader
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      python3 bench/write_random_checkpoint.py llama3-8b /tmp/ckpt8b > "$OUT/ckpt8b_write.log" 2>&1 || tail "$OUT/ckpt8b_write.log"
      du -sh /tmp/ckpt8b | tee -a "$OUT/ckpt8b_write.log"
      ARGS8=(model.name_or_path=/tmp/ckpt8b model.init=pretrained "${TRAIN70[@]:2}")
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${ARGS8[@]}" \
        data.pad_token=null data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs train.run_name=ckpt8b_2gpu > "$OUT/ckpt8b_2gpu.log" 2>&1 \
        && summarize ckpt8b-2gpu /tmp/runs/ckpt8b_2gpu || tail -40 "$OUT/ckpt8b_2gpu.log"
      python3 -m torch.distributed.run --nproc_per_node 1 recipes/llama3_8b.py "${ARGS8[@]}" data.pad_token=null data.keep_if_empty=[] \
        eval.questions=[] train.output_dir=/tmp/runs train.run_name=ckpt8b_1gpu > "$OUT/ckpt8b_1gpu.log" 2>&1 \
        && summarize ckpt8b-1gpu /tmp/runs/ckpt8b_1gpu || tail -40 "$OUT/ckpt8b_1gpu.log"
      compare_losses loss-2gpu-vs-1gpu /tmp/runs/ckpt8b_2gpu /tmp/runs/ckpt8b_1gpu
      python3 tests/workers/reload_adapter.py /tmp/runs/ckpt8b_2gpu /tmp/ckpt8b 2>"$OUT/reload.err" | python3 -c "
import json, sys; r = json.loads(sys.stdin.read().strip().splitlines()[-1]); s = json.load(open('/tmp/runs/ckpt8b_2gpu/summary.json'))
print(json.dumps({'check': 'adapter-2gpu-reloaded-on-1gpu', 'reloaded_eval_loss': r['eval_loss'], 'trained_eval_loss': s['final_eval_loss']}))" >> "$RESULTS" || tail "$OUT/reload.err"
      python3 -m torch.distributed.run --nproc_per_node 2 bench/load_like_published.py /tmp/ckpt8b 2>"$OUT/published.err" \
        | grep '^{' >> "$RESULTS" || tail "$OUT/published.err" ;;
    reload8b)  # an adapter trained on 2 GPUs, reloaded on 1 GPU by transformers + PEFT
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      [ -d /tmp/ckpt8b ] || python3 bench/write_random_checkpoint.py llama3-8b /tmp/ckpt8b > "$OUT/ckpt8b_write.log" 2>&1
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py \
        model.name_or_path=/tmp/ckpt8b model.init=pretrained "${TRAIN70[@]:2}" train.max_steps=10 data.pad_token=null \
        data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs train.run_name=reload8b > "$OUT/reload8b.log" 2>&1
      python3 tests/workers/reload_adapter.py /tmp/runs/reload8b /tmp/ckpt8b 2>"$OUT/reload.err" | tail -1 > /tmp/reloaded.json
      python3 -c "
import json; r = json.load(open('/tmp/reloaded.json')); s = json.load(open('/tmp/runs/reload8b/summary.json'))
print(json.dumps({'check': 'adapter-2gpu-reloaded-on-1gpu', 'reloaded_eval_loss': r['eval_loss'],
                  'trained_eval_loss': s['final_eval_loss'], 'first_eval_loss': s['first_eval_loss']}))" >> "$RESULTS" \
        || tail "$OUT/reload.err" ;;
    ckpt70b40)  # a 70B-width, 40-layer checkpoint (70 GB): stream-load it on 2 GPUs (2 steps); then the published loader
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      python3 bench/write_random_checkpoint.py llama3-70b /tmp/ckpt70b40 40 > "$OUT/ckpt70b40_write.log" 2>&1 \
        || tail "$OUT/ckpt70b40_write.log"
      du -sh /tmp/ckpt70b40 | tee -a "$OUT/ckpt70b40_write.log"
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_70b.py \
        model.name_or_path=/tmp/ckpt70b40 model.init=pretrained "${TRAIN70[@]:2}" train.max_steps=4 \
        train.output_dir=/tmp/runs train.run_name=ckpt70b40 > "$OUT/ckpt70b40.log" 2>&1 \
        && summarize ckpt70b40-2gpu /tmp/runs/ckpt70b40 || tail -40 "$OUT/ckpt70b40.log"
      timeout 240 python3 -m torch.distributed.run --nproc_per_node 2 bench/load_like_published.py /tmp/ckpt70b40 \
        2>"$OUT/published70.err" | grep '^{' | sed 's/published-loader/published-loader-70b40/' >> "$RESULTS" \
        || tail "$OUT/published70.err" ;;
    ckpt70b)  # 80-layer 70B: save after steps 3 and 6 (size, time), then resume from step 6 (load time), 2 steps
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      C70=("${TRAIN70[@]}" train.save_every=3 train.output_dir=/tmp/runs train.run_name=ckpt70b)
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_70b.py \
        "${C70[@]}" train.max_steps=6 > "$OUT/ckpt70b_1.log" 2>&1 || tail -30 "$OUT/ckpt70b_1.log"
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_70b.py \
        "${C70[@]}" train.max_steps=8 > "$OUT/ckpt70b_2.log" 2>&1 || tail -30 "$OUT/ckpt70b_2.log"
      checkpoint_times checkpoint-70b-80layers /tmp/runs/ckpt70b "$OUT/ckpt70b_1.log" "$OUT/ckpt70b_2.log" ;;
    slurm8b)  # slurm/train.sh unchanged, as 2 nodes x 1 GPU (bench/fake_slurm stands in for srun/scontrol), 8B, NCCL
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      PATH=$PWD/bench/fake_slurm:$PATH SLURM_JOB_ID=4242 SLURM_NTASKS=2 SLURM_JOB_NODELIST=localhost \
        SLURM_JOB_NAME=slurm8b SLURM_SUBMIT_DIR=$PWD NPROC_PER_NODE=1 RUNS_DIR=/tmp/runs \
        bash slurm/train.sh recipes/llama3_8b.py model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" \
        train.max_steps=10 data.pad_token=null data.keep_if_empty=[] eval.questions=[] > "$OUT/slurm8b.log" 2>&1 \
        && summarize slurm-train.sh-2nodes-x-1gpu-8b /tmp/runs/slurm8b-4242 || tail -40 "$OUT/slurm8b.log"
      grep -m1 "launcher(s)" "$OUT/slurm8b.log" ;;
    loss8b)  # 8B shape (random, drawn on the GPUs): 2 GPUs vs 1 GPU (2 micro-batches accumulated), 12 steps
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      L8=(model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" train.max_steps=12 data.pad_token=null
          data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs)
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${L8[@]}" \
        train.run_name=l8_2gpu > "$OUT/l8_2gpu.log" 2>&1 && summarize loss8b-2gpu /tmp/runs/l8_2gpu || tail -30 "$OUT/l8_2gpu.log"
      python3 -m torch.distributed.run --nproc_per_node 1 recipes/llama3_8b.py "${L8[@]}" train.run_name=l8_1gpu \
        > "$OUT/l8_1gpu.log" 2>&1 && summarize loss8b-1gpu /tmp/runs/l8_1gpu || tail -30 "$OUT/l8_1gpu.log"
      compare_losses loss-2gpu-vs-1gpu-8b-random /tmp/runs/l8_2gpu /tmp/runs/l8_1gpu ;;
    memory)  # shardtune plan's predicted peak GPU memory vs the measured one, per configuration (4 steps each)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 4200
      M=(data.source=/tmp/rows.jsonl data.format=text data.max_len=2048 data.test_size=4 train.global_batch_size=2
         train.micro_batch_size=1 eval.every=0 eval.samples=0 eval.max_rows=2 eval.batch_size=1 train.save_every=0
         train.max_steps=4 data.pad_token=null data.keep_if_empty=[] eval.questions=[])
      i=0
      while read -r recipe args; do
        i=$((i + 1))
        # shellcheck disable=SC2086
        python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml "$recipe" "${M[@]}" $args \
          train.output_dir=/tmp/runs train.run_name=mem$i > "$OUT/mem$i.log" 2>&1 || { tail -20 "$OUT/mem$i.log"; continue; }
        # shellcheck disable=SC2086
        python3 -m shardtune.cli plan "$recipe" "${M[@]}" $args parallel.launch_config=fsdp_configs/2xh100.yaml \
          --gpus 2 > "$OUT/mem$i.plan" 2>&1
        python3 - "$recipe $args" "$OUT/mem$i.plan" /tmp/runs/mem$i >> "$RESULTS" <<'PY'
import json, re, sys
what, plan, run = sys.argv[1:]
predicted = float(re.search(r"^  peak\s+([\d.]+) GiB", open(plan).read(), re.M).group(1))
steps = [json.loads(x) for x in open(f"{run}/metrics.jsonl") if '"gpu_peak_gib"' in x]
s = json.load(open(f"{run}/summary.json"))
print(json.dumps({"check": "plan-vs-measured", "config": what, "predicted_gib": predicted,
                  "measured_max_rank_gib": max(m["gpu_peak_gib"] for m in steps),
                  "measured_per_rank_gib": s["gpu_peak_gib_per_rank"]}))
PY
      done <<'CONFIGS'
recipes/llama3_70b.py model.name_or_path=llama3-70b model.init=random model.shape.num_hidden_layers=20
recipes/llama3_8b.py model.name_or_path=llama3-8b model.init=random parallel.activation_checkpointing=false
recipes/llama3_8b.py model.name_or_path=llama3-8b model.init=random data.max_len=4096
CONFIGS
      ;;
    levers)  # packing, Liger's fused kernels, bf16 adapters vs the plain path: loss and LoRA gradients, 1 GPU
      python3 tests/workers/gpu_levers.py 2>"$OUT/levers.err" >> "$RESULTS" || tail -30 "$OUT/levers.err" ;;
    memtrace)  # GPU memory phase by phase in step 2 (SHARDTUNE_MEMORY_TRACE), 70B x 20 layers and 8B, 3 steps
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      for shape in "recipes/llama3_70b.py model.name_or_path=llama3-70b model.shape.num_hidden_layers=20" \
                   "recipes/llama3_8b.py model.name_or_path=llama3-8b parallel.activation_checkpointing=false"; do
        # shellcheck disable=SC2086
        SHARDTUNE_MEMORY_TRACE=2 python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml $shape \
          model.init=random "${TRAIN70[@]:2}" train.max_steps=3 eval.batch_size=1 eval.max_rows=2 data.pad_token=null \
          data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs train.run_name=trace 2>&1 \
          | grep -E "memory GiB|load:" | sed "s|^|${shape%% *} |" | tee -a "$OUT/memtrace.txt"
        rm -rf /tmp/runs/trace
      done ;;
    profile8b)  # where an 8B step's time goes, 2 GPUs vs 1 GPU (torch.profiler over steps 5-6; tables in $OUT)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      P8=(model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" train.max_steps=6 data.pad_token=null
          data.keep_if_empty=[] eval.questions=[] eval.max_rows=1 train.output_dir=/tmp/runs)
      SHARDTUNE_PROFILE=5:6:$OUT/profile8b_2gpu python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml \
        recipes/llama3_8b.py "${P8[@]}" train.run_name=p8_2gpu > "$OUT/p8_2gpu.log" 2>&1 \
        && summarize profile8b-2gpu /tmp/runs/p8_2gpu || tail -30 "$OUT/p8_2gpu.log"
      SHARDTUNE_PROFILE=5:6:$OUT/profile8b_1gpu python3 -m torch.distributed.run --nproc_per_node 1 recipes/llama3_8b.py \
        "${P8[@]}" train.global_batch_size=1 train.run_name=p8_1gpu > "$OUT/p8_1gpu.log" 2>&1 \
        && summarize profile8b-1gpu /tmp/runs/p8_1gpu || tail -30 "$OUT/p8_1gpu.log"
      rm -f "$OUT"/profile8b_*/rank*.json ;;
    zero3)  # DeepSpeed ZeRO-3: sharded vs unsharded logits (8B, 70B widths x 20), then 8B 20 steps against FSDP
      # deepspeed for this group only (gpu_env.sh leaves it out: transformers imports it when present)
      [ -d /tmp/site_ds ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_ds \
        .whl/deepspeed-*.whl
      DS=(env "PYTHONPATH=/tmp/site_ds:$PYTHONPATH")
      for shape in "llama3-8b" "llama3-70b model.shape.num_hidden_layers=20"; do
        # shellcheck disable=SC2086
        "${DS[@]}" python3 -m torch.distributed.run --nproc_per_node 2 tests/workers/gpu_exact.py $shape \
          parallel.backend=deepspeed 2>"$OUT/zero3_exact.err" | grep '^{' | sed 's/^{/{"check": "exact-zero3", /' \
          >> "$RESULTS" || tail -30 "$OUT/zero3_exact.err"
      done
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      Z8=(model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" data.pad_token=null data.keep_if_empty=[]
          eval.questions=[] model.fused_kernels=false train.output_dir=/tmp/runs optim.name=adamw)  # ZeRO-3: AdamW only
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${Z8[@]}" \
        train.run_name=z8_fsdp > "$OUT/z8_fsdp.log" 2>&1 && summarize 8b-fsdp /tmp/runs/z8_fsdp || tail -30 "$OUT/z8_fsdp.log"
      "${DS[@]}" python3 -m accelerate.commands.launch --config_file fsdp_configs/zero3_2xh100.yaml recipes/llama3_8b.py \
        "${Z8[@]}" train.run_name=z8_zero3 > "$OUT/z8_zero3.log" 2>&1 && summarize 8b-zero3 /tmp/runs/z8_zero3 \
        || tail -30 "$OUT/z8_zero3.log"
      compare_losses loss-zero3-vs-fsdp-8b /tmp/runs/z8_zero3 /tmp/runs/z8_fsdp ;;
    a10g2)  # the 4xA10G command as written, on the 2 GPUs lent (the 4-GPU kind is withheld), each capped at 24 GiB
      python3 bench/make_rows.py /tmp/rows.jsonl 64 3100
      python3 -m accelerate.commands.launch --config_file fsdp_configs/4xa10g.yaml --num_processes 2 \
        recipes/llama3_70b.py model.name_or_path=llama3-70b model.init=random data.source=/tmp/rows.jsonl \
        data.format=text data.test_size=2 train.max_steps=8 eval.every=0 eval.samples=0 eval.max_rows=2 \
        train.save_every=0 train.log_every=1 parallel.gpu_memory_limit_gib=24 train.output_dir=/tmp/runs \
        train.run_name=a10g2 > "$OUT/a10g2.log" 2>&1 \
        && summarize 4xa10g.yaml-as-2-processes-capped-24GiB-70b-80layers /tmp/runs/a10g2 || tail -30 "$OUT/a10g2.log" ;;
    offload)  # host memory with CPU offload, phase by phase (70B widths x 20 layers), and without offload
      for off in true false; do
        python3 -m torch.distributed.run --nproc_per_node 2 bench/offload_probe.py parallel.cpu_offload=$off \
          2>"$OUT/offload.err" | grep '^{' >> "$RESULTS" || tail -20 "$OUT/offload.err"
      done ;;
    smoke)  # shardtune doctor, then doctor --smoke on the 8B shape: load, 2 steps, save, resume, 1 step (GPUS=2)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      S8=(recipes/llama3_8b.py model.name_or_path=llama3-8b model.init=random data.source=/tmp/rows.jsonl
          data.format=text data.max_len=2048 data.test_size=2 train.global_batch_size=8 data.pad_token=null
          data.keep_if_empty=[] --gpus "${GPUS:-2}")
      python3 -m shardtune.cli doctor "${S8[@]}" > "$OUT/doctor.log" 2>&1; cat "$OUT/doctor.log"
      python3 -m shardtune.cli doctor "${S8[@]}" --smoke > "$OUT/smoke.log" 2>&1; tail -8 "$OUT/smoke.log" ;;
    resume8b)  # 8B shape (random, drawn on the GPUs): uninterrupted vs SIGUSR1 at step 6 then resumed
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      R8=(model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" train.max_steps=12 train.save_every=4
          data.pad_token=null data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs)
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${R8[@]}" \
        train.run_name=r8_ref > "$OUT/r8_ref.log" 2>&1 || tail -30 "$OUT/r8_ref.log"
      SHARDTUNE_FAULT="rank=0,step=5,micro=0,action=sigusr1" python3 -m accelerate.commands.launch --config_file \
        fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${R8[@]}" train.run_name=r8_cut > "$OUT/r8_cut1.log" 2>&1
      python3 -m accelerate.commands.launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py "${R8[@]}" \
        train.run_name=r8_cut > "$OUT/r8_cut2.log" 2>&1 || tail -30 "$OUT/r8_cut2.log"
      python3 - >> "$RESULTS" <<'PY'
import json, re
def losses(run):
    out = {}
    for x in open(f"/tmp/runs/{run}/metrics.jsonl"):
        r = json.loads(x)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out
a, b = losses("r8_ref"), losses("r8_cut")
import os
log1, log2 = (open(os.path.join(os.environ["OUT"], f)).read() for f in ("r8_cut1.log", "r8_cut2.log"))
saves = re.findall(r"saved to \S+ \(([\d.]+) MiB\) in ([\d.]+)s", log1 + log2)
loads = re.findall(r"loaded in ([\d.]+)s", log2)
print(json.dumps({"check": "8b-sigusr1-resume", "steps": len(b), "max_abs_diff": max(abs(a[k] - b[k]) for k in a),
                  "identical": a == b, "status_after_signal": "got SIGUSR1" in log1,
                  "checkpoint_mib": float(saves[0][0]) if saves else None,
                  "save_s": [float(s[1]) for s in saves], "load_s": [float(x) for x in loads]}))
PY
      ;;
    restart8b)  # launch/node.sh (every GPU, MAX_RESTARTS=1): a process killed once in step 7, restarted within the
      # same command from step-4, against the same command uninterrupted (8B shape, random, 12 steps)
      python3 bench/make_rows.py /tmp/rows.jsonl 64 2100
      if ! command -v torchrun > /dev/null; then  # the image's torch has no console script on PATH
        mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m torch.distributed.run "$@"\n' > /tmp/bin/torchrun
        chmod +x /tmp/bin/torchrun && export PATH=/tmp/bin:$PATH
      fi
      N8=(model.name_or_path=llama3-8b model.init=random "${TRAIN70[@]:2}" train.max_steps=12 train.save_every=4
          data.pad_token=null data.keep_if_empty=[] eval.questions=[] train.output_dir=/tmp/runs)
      launch/node.sh recipes/llama3_8b.py "${N8[@]}" train.run_name=n8_ref > "$OUT/n8_ref.log" 2>&1 \
        || tail -30 "$OUT/n8_ref.log"
      rm -f /tmp/fired
      SHARDTUNE_FAULT="rank=0,step=6,micro=0,action=kill,once=/tmp/fired" launch/node.sh recipes/llama3_8b.py \
        "${N8[@]}" train.run_name=n8_cut > "$OUT/n8_cut.log" 2>&1 || tail -30 "$OUT/n8_cut.log"
      compare_losses 8b-crash-restarted /tmp/runs/n8_ref /tmp/runs/n8_cut
      echo "{\"check\": \"8b-crash-restarted-log\", \"crashed\": $([ -f /tmp/fired ] && echo true || echo false), \
\"restarted\": $(grep -c 'the launcher restarted the processes' "$OUT/n8_cut.log"), \
\"resumed_from_step_4\": $(grep -c '(step 4, saved by' "$OUT/n8_cut.log"), \
\"status\": \"$(python3 -c 'import json; print(json.load(open("/tmp/runs/n8_cut/status.json"))["status"])')\"}" \
        >> "$RESULTS" ;;
  esac
done
echo; echo "=== results ($RESULTS)"; cat "$RESULTS"
