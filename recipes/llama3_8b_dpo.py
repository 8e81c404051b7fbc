"""Llama-3-8B preference tuning (DPO) on HuggingFaceH4/ultrafeedback_binarized, QLoRA under FSDP, continuing from
an SFT adapter: the Zephyr recipe's second half (alignment-handbook zephyr-7b-dpo-qlora: beta 0.01, lr 5e-6).

The rows are ultrafeedback's as the hub has them (split train_prefs, eval on test_prefs; prompt, chosen and
rejected conversations, messages and scores): data.format=auto reads them as preference pairs, renders them with
the plain-text Human/Assistant template, and trains on the responses only. The reference is the SFT adapter it
starts from, frozen (objective.reference=auto; objective.reference=base: the 4-bit base with the adapters off).
The adapter must share its LoRA settings (r 16, alpha 32, every linear layer) and base, and is best trained on
the same prompt format, e.g. on HuggingFaceH4/ultrachat_200k:

    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b.py \\
        data.source=HuggingFaceH4/ultrachat_200k data.split=train_sft data.eval_split=test_sft \\
        data.format=chat data.chat_template=human_assistant data.packing=true
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b_dpo.py
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b_dpo.py model.adapter=OTHER/adapter
    accelerate launch --config_file fsdp_configs/2xh100.yaml recipes/llama3_8b_dpo.py model.adapter=null   # from scratch

A pair is two sequences of up to 1024 tokens in one micro-batch: `shardtune plan recipes/llama3_8b_dpo.py` counts
twice a row's activations and logits, and the reference's forward in the step's time.
"""

from shardtune import Config
from shardtune.cli.recipe import main


def config() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "meta-llama/Meta-Llama-3-8B"
    cfg.model.init = "pretrained"
    cfg.model.adapter = "runs/llama3_8b/adapter"  # what recipes/llama3_8b.py leaves behind
    cfg.objective.name = "dpo"
    cfg.objective.beta = 0.01
    cfg.data.source = "HuggingFaceH4/ultrafeedback_binarized"
    cfg.data.split = "train_prefs"
    cfg.data.eval_split = "test_prefs"
    cfg.data.chat_template = "human_assistant"
    cfg.data.max_len = 1024
    cfg.data.pad_token = "<|reserved_special_token_0|>"
    cfg.data.packing = True
    cfg.lora.r = 16
    cfg.lora.alpha = 32
    cfg.lora.dropout = 0.05
    cfg.optim.lr = 5e-6
    cfg.optim.warmup_steps = 50
    cfg.train.max_steps = None
    cfg.train.epochs = 1
    cfg.train.global_batch_size = 32
    cfg.train.micro_batch_size = 2
    cfg.train.save_every = 100
    cfg.eval.every = 100
    cfg.eval.max_rows = 256
    cfg.eval.batch_size = 2
    cfg.eval.samples = 8
    cfg.eval.max_new_tokens = 128
    cfg.parallel.mixed_precision = "bf16"
    cfg.parallel.activation_checkpointing = True
    return cfg


if __name__ == "__main__":
    main(config)
