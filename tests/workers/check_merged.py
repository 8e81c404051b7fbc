"""Compare a merged model with its base + adapter: logits of AutoModelForCausalLM.from_pretrained(MERGED) vs
PeftModel(quantized base, adapter), on held-out rows. usage: python check_merged.py RUN_DIR MERGED_DIR"""

import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shardtune.config import Config
from shardtune.model.modeling import DTYPES, quantization_config

run, merged_dir = Path(sys.argv[1]), Path(sys.argv[2])
cfg = Config.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
base = AutoModelForCausalLM.from_pretrained(
    run / "base",
    quantization_config=quantization_config(cfg),
    dtype=DTYPES[cfg.param_dtype],
    device_map={"": "cpu"},
)
reference = PeftModel.from_pretrained(base, run / "adapter").eval()
for m in reference.modules():
    if isinstance(m, bnb.nn.Linear4bit):
        m.support_avx512bf16_for_cpu = False
    if isinstance(m, bnb.nn.Linear8bitLt):  # LLM.int8 as in training: on a CPU, the dequantized weight
        m.train()
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
batch = torch.randint(0, 384, (4, 40), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a = reference(input_ids=batch).logits.float()
    b = merged(input_ids=batch).logits.float()
    with reference.disable_adapter():
        plain = reference(input_ids=batch).logits.float()
rel = lambda x, y: float((x - y).norm() / x.norm())  # noqa: E731
# adapter_effect shows the comparison is not trivially met: the adapter moves the logits by this much
print(
    json.dumps(
        {
            "rel_l2": rel(a, b),
            "adapter_effect": rel(a, plain),
            "merged_dtype": str(next(merged.parameters()).dtype),
        }
    )
)
