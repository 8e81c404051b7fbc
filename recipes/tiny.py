"""The embedded default: a tiny random Llama, NF4 4-bit base + LoRA, learning to reverse and sort letters
on 2 CPU processes under FSDP, in about two minutes.

    accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny.py
    torchrun --nproc_per_node 2 recipes/tiny.py
"""

from shardtune import Config
from shardtune.cli.recipe import main


def config() -> Config:
    return Config()  # the defaults are the embedded default run


if __name__ == "__main__":
    main(config)
