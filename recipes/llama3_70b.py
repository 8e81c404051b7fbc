"""Llama-3-70B on no_robots chat data with FSDP + QLoRA, sized for 4x A10G (24 GB each).

3072-token rows, micro-batch 1, global batch 8, activation checkpointing and CPU offload, a plain-text
Human/Assistant chat template (the base model's special chat tokens were never trained).

    accelerate launch --config_file fsdp_configs/4xa10g.yaml recipes/llama3_70b.py
"""

from shardtune import Config
from shardtune.cli.recipe import main


def config() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "meta-llama/Meta-Llama-3-70B"
    cfg.model.init = "pretrained"
    cfg.data.source = "HuggingFaceH4/no_robots"
    cfg.data.eval_split = "test"
    cfg.data.format = "chat"
    cfg.data.chat_template = "human_assistant"
    cfg.data.max_len = 3072
    cfg.lora.r = 16
    cfg.lora.alpha = 8
    cfg.lora.dropout = 0.05
    cfg.optim.lr = 2e-4
    cfg.optim.scheduler = "constant"
    cfg.optim.warmup_steps = 20
    cfg.train.max_steps = None
    cfg.train.epochs = 3
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 1
    cfg.train.save_every = 100
    cfg.eval.every = 100
    cfg.eval.batch_size = 1
    cfg.eval.samples = 4
    cfg.eval.max_new_tokens = 128
    cfg.parallel.mixed_precision = "bf16"
    cfg.parallel.activation_checkpointing = True
    cfg.parallel.cpu_offload = True
    return cfg


if __name__ == "__main__":
    main(config)
