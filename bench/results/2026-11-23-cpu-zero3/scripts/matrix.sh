export PYTHONPATH=/tmp/ds_site OMP_NUM_THREADS=1
T=/work/main/.venv/bin/torchrun
run() { name=$1; shift; timeout 300 $T --nproc_per_node 2 z3_qlora.py "$@" > run_$name.log 2>&1; echo "== $name rc=$?"; grep "^\[rank0\]" run_$name.log | grep -v "other params\|lora param"; grep -i "error\|Traceback" run_$name.log | head -5; }
run uint8_bf16 --storage uint8 --bf16 --compute bf16 --ref ref_c16_cast.pt,ref_uint8.pt
run bf16_bf16 --storage bf16 --bf16 --compute bf16 --ref ref_c16_cast.pt,ref_uint8.pt
run fp32_bf16 --storage fp32 --bf16 --compute bf16 --ref ref_c16_cast.pt,ref_uint8.pt
run fp32_fp32 --storage fp32 --compute fp32 --ref ref_uint8.pt
run bf16_fp32 --storage bf16 --compute fp32 --ref ref_uint8.pt
