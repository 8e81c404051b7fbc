"""In a fresh process, without shardtune's training code: load a preference run's base with transformers (4-bit,
as trained), attach the saved adapter with PeftModel.from_pretrained, and score the held-out pairs as the run
did: DPO's implicit reward beta * (log pi - log ref) of each response, the reference being the same model under
disable_adapter(). Prints one JSON line (reward accuracy, margin, DPO loss).
usage: python reload_preference.py RUN_DIR"""

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
base = AutoModelForCausalLM.from_pretrained(
    run / "base",
    quantization_config=quantization_config(cfg),
    dtype=DTYPES[cfg.param_dtype],
    device_map={"": "cpu"},
)
for m in base.modules():
    if isinstance(m, bnb.nn.Linear4bit):  # same kernels as training on this CPU (see loading.py)
        m.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, run / "adapter")
model.eval()
data = build_data(cfg.data, tokenizer, cfg.train.seed, cfg.objective.name)
n = min(len(data.eval), cfg.eval.max_rows or len(data.eval))


def logps(batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (lp * (labels != -100)).sum(-1)


chosen, rejected = [], []
with torch.no_grad():
    for start in range(0, n, cfg.eval.batch_size):
        rows = list(range(start, min(start + cfg.eval.batch_size, n)))
        batch = collate(data.eval.sequences(rows), tokenizer.pad_token_id)
        policy = logps(batch)
        with model.disable_adapter():
            ref = logps(batch)
        c, r = (cfg.objective.beta * (policy - ref)).chunk(2)
        chosen.append(c)
        rejected.append(r)
chosen, rejected = torch.cat(chosen), torch.cat(rejected)
print(
    json.dumps(
        {
            "pairs": len(chosen),
            "reward_accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item(),
            "dpo_loss": -F.logsigmoid(chosen - rejected).mean().item(),
        }
    )
)
