"""OpenLLaMA-3B QLoRA that writes product descriptions from a product name and category (Red Dot Design
Award descriptions): what the base model writes for a few held-out products (the adapters off, at the start),
then what the tuned model writes (at every eval and at the end), side by side in generations.jsonl and the
summary; and the sweep that compares LoRA settings on a 4-bit and an 8-bit base in one table.

    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/product_descriptions.py
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/product_descriptions.py --sweep
    ... recipes/product_descriptions.py --sweep quant.bits=4,8,16          # any other grid

The 8-bit rows (bitsandbytes' LLM.int8) keep the whole 8-bit base on every GPU: FSDP cannot shard int8 weights
(docs/multi-gpu.md). bitsandbytes 0.50 also runs them on a CPU (tests/test_recipes.py runs the whole table there).
"""

from shardtune import Config
from shardtune.cli.recipe import main

# attention-only (q_proj, v_proj) / every linear layer x a 4-bit NF4 / an 8-bit LLM.int8 base: 4 runs; the table
# holds each run's eval loss and its samples' ROUGE-L, the base model's (adapters off) beside the tuned one's
SWEEP = {"lora.target_modules": [["q_proj", "v_proj"], "all-linear"], "quant.bits": [4, 8]}


def config() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "openlm-research/open_llama_3b_v2"
    cfg.model.init = "pretrained"
    cfg.data.source = "xiyuez/red-dot-design-award-product-description"
    cfg.data.format = "alpaca"
    cfg.data.fields = {
        "instruction": "Create a detailed description for the following product: {product}, "
        "belonging to category: {category}",
        "output": "{description}",
    }
    cfg.data.response_suffix = "\n\n### End"
    cfg.data.test_size = 0.1
    cfg.data.max_len = 512
    cfg.lora.r = 8
    cfg.lora.alpha = 16
    cfg.lora.dropout = 0.05
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    cfg.optim.lr = 2e-4
    cfg.train.max_steps = None
    cfg.train.epochs = 1
    cfg.train.global_batch_size = 16
    cfg.train.micro_batch_size = 4
    cfg.eval.every = 50
    cfg.eval.samples = 8
    cfg.eval.max_new_tokens = 128
    cfg.eval.batch_size = 4
    cfg.parallel.mixed_precision = "bf16"
    return cfg


if __name__ == "__main__":
    main(config, sweep=SWEEP)
