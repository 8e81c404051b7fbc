"""OpenLLaMA-3B QLoRA that writes product descriptions from a product name and category (Red Dot Design
Award descriptions), with the rank x target-modules sweep that compares LoRA settings in one table.

    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/product_descriptions.py
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/product_descriptions.py --sweep
"""

from shardtune import Config
from shardtune.cli.recipe import main

# rank 8 / 16 x attention-only (q_proj, v_proj) / every linear layer
SWEEP = {"lora.r": [8, 16], "lora.target_modules": [["q_proj", "v_proj"], "all-linear"]}


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
