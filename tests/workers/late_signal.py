"""Run a recipe in-process to its end, then deliver SIGUSR1 to this process, as `srun --signal=USR1@N` does
when its time-limit warning comes after the last step (it may come up to a minute early).
usage: python tests/workers/late_signal.py recipes/X.py [key=value ...]"""

import os
import signal
import sys
import time

from shardtune.cli.main import load_recipe_config
from shardtune.cli.recipe import main

recipe, overrides = sys.argv[1], sys.argv[2:]
sys.argv = [recipe, *overrides]
main(lambda: load_recipe_config(recipe))
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(1)  # a signal that is not ignored has acted by now
print("survived the late SIGUSR1")
