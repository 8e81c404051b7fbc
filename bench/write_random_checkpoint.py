"""Write a random-weight Hugging Face checkpoint (bf16 safetensors shards + the built-in tokenizer) of a
built-in shape, built on the GPU, for load measurements:
    python bench/write_random_checkpoint.py llama3-8b /tmp/ckpt8b [num_hidden_layers]"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM

from shardtune.config import Config
from shardtune.model.modeling import model_config
from shardtune.model.tokenizer import build_tiny_tokenizer

shape, out = sys.argv[1], sys.argv[2]
cfg = Config()
cfg.model.name_or_path = shape
hf_config = model_config(cfg)
if len(sys.argv) > 3:
    hf_config.num_hidden_layers = int(sys.argv[3])
t0 = time.perf_counter()
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
build_tiny_tokenizer().save_pretrained(out)
print(
    f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params in {time.perf_counter() - t0:.0f}s"
)
