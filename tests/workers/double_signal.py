"""Run a recipe in-process, and deliver a second SIGTERM to this process while its first checkpoint after the
first signal is being written (rank 0, slowed down so that the second signal lands mid-save).
usage: torchrun --nproc_per_node 2 tests/workers/double_signal.py recipes/X.py [key=value ...]"""

import os
import signal
import sys
import threading

from shardtune.checkpoint import manager as checkpoint
from shardtune.cli.main import load_recipe_config
from shardtune.cli.recipe import main

_save = checkpoint.CheckpointManager.save


def save_with_second_signal(self, step, *args, **kwargs):
    if self.dist.is_main and step == 4:  # the save the first signal (at step 3) triggers

        def second():
            os.kill(os.getpid(), signal.SIGTERM)
            os.write(2, b"second SIGTERM delivered\n")

        threading.Timer(0.05, second).start()
    return _save(self, step, *args, **kwargs)


checkpoint.CheckpointManager.save = save_with_second_signal
recipe, overrides = sys.argv[1], sys.argv[2:]
sys.argv = [recipe, *overrides]
main(lambda: load_recipe_config(recipe))
