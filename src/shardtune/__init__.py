"""shardtune: QLoRA fine-tuning of Llama-family models sharded with PyTorch FSDP."""

import logging

from shardtune.config import Config
from shardtune.errors import ConfigError

# NOTE: on AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the hub when it is imported
# and logs a warning when it cannot (always, offline); that kernel only serves the repacked eval format,
# which shardtune turns off (modeling.py). Set before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
