"""In a fresh process, without shardtune's training code: load the run's base with transformers (4-bit, as
trained, on the GPU if there is one), attach the saved adapter with PeftModel.from_pretrained, and compute
the held-out loss the same way the run did (mean cross-entropy over response tokens, the run's eval
batches). Prints one JSON line.  usage: python reload_adapter.py RUN_DIR [BASE_DIR]"""

import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.config import Config
from shardtune.data.loader import build_data, collate
from shardtune.model.modeling import DTYPES, quantization_config

run = Path(sys.argv[1])
cfg = Config.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
base_dir = sys.argv[2] if len(sys.argv) > 2 else run / "base"
device = "cuda:0" if torch.cuda.is_available() else "cpu"
base = AutoModelForCausalLM.from_pretrained(
    base_dir,
    quantization_config=quantization_config(cfg),
    dtype=DTYPES[cfg.param_dtype],
    device_map={"": device},
    attn_implementation="sdpa",
)
for m in base.modules():
    if isinstance(m, bnb.nn.Linear4bit):  # same kernels as training on this CPU (see loading.py)
        m.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, run / "adapter")
model.eval()
data = build_data(cfg.data, tokenizer, cfg.train.seed, cfg.objective.name)
n = min(len(data.eval), cfg.eval.max_rows or len(data.eval))
total = count = 0.0
with torch.no_grad():
    for start in range(0, n, cfg.eval.batch_size):
        batch = collate(
            [data.eval.row(i) for i in range(start, min(start + cfg.eval.batch_size, n))],
            tokenizer.pad_token_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += F.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="sum"
        ).item()
        count += int((batch["labels"] != -100).sum())
print(
    json.dumps({"eval_loss": total / count, "lora_modules": len(model.peft_config["default"].target_modules)})
)
