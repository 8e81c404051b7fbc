"""Run a recipe in-process (a sweep of it, with --sweep) and record what the garbage collector sees at every
training step: the objects frozen out of its sight (the libraries, the model, the data) and those it still
tracks (its full collections walk these); the same once the runs have returned; and, as each run builds its
model, how many parameters of the run before are still alive. Prints one JSON line.
usage: python tests/workers/gc_frozen.py recipes/X.py [key=value ...] [--sweep key=v1,v2]"""

import gc
import json
import sys
import weakref

from shardtune.cli.main import load_recipe_config
from shardtune.cli.recipe import main
from shardtune.model import loading
from shardtune.train.step import TrainStep

steps, builds, previous = [], [], []
train_step, build_model = TrainStep.__call__, loading.build_model


def seen() -> dict:
    return {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}


def recorded(self, step):
    steps.append(seen())
    return train_step(self, step)


def built(*args, **kwargs):
    builds.append({"previous_params_alive": sum(ref() is not None for ref in previous)})
    model, report = build_model(*args, **kwargs)
    previous[:] = [weakref.ref(p) for p in model.parameters()]
    return model, report


TrainStep.__call__, loading.build_model = recorded, built
recipe, overrides = sys.argv[1], sys.argv[2:]
sys.argv = [recipe, *overrides]
main(lambda: load_recipe_config(recipe))
print(json.dumps({"steps": steps, "builds": builds, "after": seen()}))
