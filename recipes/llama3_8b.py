"""Llama-3-8B instruction tuning on alpaca-cleaned (rows without an `input`), QLoRA under FSDP.

Completion-only loss after "### Response:\\n", a reserved special token as pad, EOS appended, 1% held out,
bitsandbytes' 8-bit AdamW (optim.name=adamw_8bit) at a constant rate after warmup, eval every 10 steps and a
checkpoint every 50, TensorBoard logs (tensorboard --logdir runs/llama3_8b/tensorboard), and answers to a few
questions after training.
Rows are packed without padding (alpaca answers run from a few tokens to a thousand) and Liger's fused kernels
run where installed; with fsdp_configs/2xh100.yaml activation checkpointing and sharding are `auto`: only as many
layers are recomputed as the GPU's memory needs, and the 4-bit base is kept whole on every GPU where it fits
(BENCHMARKS.md).

    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py data.source=my_rows.jsonl
    accelerate launch --config_file fsdp_configs/zero3_2xh100.yaml recipes/llama3_8b.py optim.name=adamw
(DeepSpeed ZeRO-3 takes torch's AdamW only.)
"""

from shardtune import Config
from shardtune.cli.recipe import main


def config() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "meta-llama/Meta-Llama-3-8B"
    cfg.model.init = "pretrained"
    cfg.data.source = "yahma/alpaca-cleaned"
    cfg.data.format = "alpaca"
    cfg.data.keep_if_empty = ["input"]
    cfg.data.test_size = 0.01
    cfg.data.max_len = 1024
    cfg.data.pad_token = "<|reserved_special_token_0|>"
    cfg.data.packing = True
    cfg.lora.r = 16
    cfg.lora.alpha = 32
    cfg.lora.dropout = 0.05
    cfg.optim.name = "adamw_8bit"
    cfg.optim.scheduler = "constant_with_warmup"
    cfg.optim.lr = 2e-4
    cfg.optim.warmup_steps = 30
    cfg.train.max_steps = None
    cfg.train.epochs = 1
    cfg.train.global_batch_size = 16
    cfg.train.micro_batch_size = 4
    cfg.train.save_every = 50
    cfg.eval.every = 10
    cfg.eval.samples = 8
    cfg.eval.samples_every = (
        5  # the tuned model's samples every 50 steps (128 tokens each: not at every eval)
    )
    cfg.eval.max_new_tokens = 128
    cfg.eval.batch_size = 4
    cfg.eval.questions = [
        "What is the capital of France?",
        "Explain what a hash table is in two sentences.",
        "Give three tips for staying focused while studying.",
    ]
    cfg.parallel.mixed_precision = "bf16"
    cfg.parallel.activation_checkpointing = True
    return cfg


if __name__ == "__main__":
    main(config)
