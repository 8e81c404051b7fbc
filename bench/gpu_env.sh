# Sourced by the GPU scripts in bench/: the NVLink settings every GPU command runs with, $OUT for logs, the
# wheels the GPU image lacks (.whl/, see ../shared/tools/gpu_wheels.sh) installed into /tmp/site, and the machine
# and library versions written to $OUT/machine.txt. (deepspeed is left out: transformers imports it when present.)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
if [ -d .whl ]; then
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $(ls .whl/*.whl | grep -v deepspeed) && touch /tmp/site/.installed; } || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/machine.txt"
