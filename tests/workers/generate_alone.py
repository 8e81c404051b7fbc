"""In a fresh process, without shardtune's model code: generate greedily for the prompts a run wrote to
generations.jsonl with transformers' base model alone (as the run's config loads it: quantized, on the CPU), then
with PeftModel.from_pretrained(that base, ADAPTER), one prompt at a time, through the run's own generation
function; print both beside the run's records (adapters off / on at step 0). Prints one JSON line.
usage: python generate_alone.py RUN_DIR ADAPTER_DIR"""

import contextlib
import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.config import Config
from shardtune.model.modeling import DTYPES, quantization_config
from shardtune.parallel.distributed import DistInfo
from shardtune.train.generate import generate

run, adapter = Path(sys.argv[1]), Path(sys.argv[2])
cfg = Config.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
records = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
written = {
    side: {
        r["prompt"]: r["generated"]
        for r in records
        if "reference" in r and r["adapter"] == side and r["step"] == 0
    }
    for side in ("off", "on")
}
prompts = list(written["off"])
base = AutoModelForCausalLM.from_pretrained(
    cfg.model.name_or_path,
    quantization_config=quantization_config(cfg),
    dtype=DTYPES[cfg.param_dtype],
    device_map={"": "cpu"},
    attn_implementation="sdpa",
)
for m in base.modules():
    if isinstance(m, bnb.nn.Linear4bit):  # same kernels as training on this CPU (see loading.py)
        m.support_avx512bf16_for_cpu = False


class Whole:
    """What generate() asks of a backend, for a model in one piece."""

    def __init__(self, model):
        self.model = model

    def gathered_root(self):
        return contextlib.nullcontext()

    def unwrap(self):
        return self.model


def alone(model) -> list[str]:
    info = DistInfo.alone(torch.device("cpu"))
    return generate(
        Whole(model), model, tokenizer, info, contextlib.nullcontext, prompts, cfg.eval.max_new_tokens, 1
    )


plain = alone(base)
tuned = alone(PeftModel.from_pretrained(base, adapter))
print(
    json.dumps(
        {
            "base": plain,
            "run_base": [written["off"][p] for p in prompts],
            "tuned": tuned,
            "run_tuned": [written["on"].get(p) for p in prompts],
        }
    )
)
