"""Run a recipe in-process and record, at every training step, what the garbage collector sees: the objects
frozen out of its sight (the libraries, the model, the data) and those it still tracks (its full collections
walk these); then the same once the run has returned. Prints one JSON line.
usage: python tests/workers/gc_frozen.py recipes/X.py [key=value ...]"""

import gc
import json
import sys

from shardtune.cli import load_recipe_config
from shardtune.recipe import main
from shardtune.trainer import Trainer

steps = []
train_step = Trainer.train_step


def seen() -> dict:
    return {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}


def recorded(self, step):
    steps.append(seen())
    return train_step(self, step)


Trainer.train_step = recorded
recipe, overrides = sys.argv[1], sys.argv[2:]
sys.argv = [recipe, *overrides]
main(lambda: load_recipe_config(recipe))
print(json.dumps({"steps": steps, "after": seen()}))
