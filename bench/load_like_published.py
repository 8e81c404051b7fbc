"""How much host RAM the published recipe's loading needs on a checkpoint: every rank calls transformers'
from_pretrained with a BitsAndBytesConfig (NF4, double quant, bf16 storage) onto its GPU, as TRL's
SFTTrainer + accelerate FSDP does. Run under torchrun; prints rank 0's JSON line.
    torchrun --nproc_per_node 2 bench/load_like_published.py CKPT"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from shardtune.observability.memory import host_peak_gib, host_rss_gib

rank = int(os.environ.get("LOCAL_RANK", 0))
torch.cuda.set_device(rank)
torch.zeros(1, device="cuda")  # CUDA context first: "idle" includes it for both loaders
start, t0 = host_rss_gib(), time.perf_counter()
quant = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
    bnb_4bit_quant_storage=torch.bfloat16,
)
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], quantization_config=quant, dtype=torch.bfloat16, device_map={"": rank}
)
if rank == 0:
    print(
        json.dumps(
            {
                "check": "published-loader",
                "load_s": time.perf_counter() - t0,
                "host_gib_over_start": host_peak_gib() - start,
                "gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        ),
        flush=True,
    )
