"""The embedded preference-tuning demo: DPO on the same tiny random Llama (NF4 4-bit base + LoRA, 2 CPU
processes under FSDP) with generated pairs: for "Sort the letters: d b c a" the right answer is chosen and a
near miss (two letters swapped) rejected. The reference is the base with the adapters off. In about three
minutes the held-out reward accuracy goes from 0 to ~1 and the DPO loss from ln 2 to a few hundredths.

    accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny_dpo.py
    accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny_dpo.py objective.name=orpo

After the SFT demo (recipes/tiny.py, run directory runs/tiny), continue from its adapter on its base (the
reference is then that adapter, frozen: objective.reference=auto):

    accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny_dpo.py \\
        model.adapter=runs/tiny/adapter model.name_or_path=runs/tiny/base model.init=pretrained
"""

from shardtune import Config
from shardtune.cli.recipe import main


def config() -> Config:
    cfg = Config()  # the embedded default's model, LoRA and hardware
    cfg.objective.name = "dpo"
    cfg.objective.beta = 0.5  # a margin of ~2 nats between the responses halves the loss
    cfg.data.generated.rows = 3000  # pairs (the generated task gives pairs for dpo and orpo)
    cfg.train.max_steps = 120
    cfg.train.global_batch_size = 16  # pairs per step: 32 sequences
    cfg.train.micro_batch_size = 8
    cfg.eval.every = 30
    cfg.eval.max_rows = 128
    cfg.eval.samples = 16
    return cfg


if __name__ == "__main__":
    main(config)
