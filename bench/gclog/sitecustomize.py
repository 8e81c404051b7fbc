"""Logs the garbage collector's pauses in every Python process started with this folder on PYTHONPATH:
each full (generation 2) collection and any other over 10 ms, and what gc.freeze() froze, as "GCLOG" lines
on stderr (in a bench run's log, between its step lines). GC_NOFREEZE=1 turns gc.freeze() into a no-op, to
see a run as it was before shardtune froze its long-lived objects (bench/results/2026-12-02-1xh200-gc).
    PYTHONPATH=$PWD/bench/gclog:$PYTHONPATH shardtune bench llama3-70b --gpus 1 ...
"""

import gc
import os
import sys
import time

_freeze = gc.freeze
_start = [0.0]


def _say(text: str) -> None:
    print(f"GCLOG {text}", file=sys.stderr, flush=True)


def _logged_freeze() -> None:
    if os.environ.get("GC_NOFREEZE"):
        _say(f"freeze skipped; tracked {len(gc.get_objects())}")
        return
    _freeze()
    _say(f"froze {gc.get_freeze_count()}; tracked {len(gc.get_objects())}")


def _pause(phase: str, info: dict) -> None:
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _start[0]) * 1e3
    if ms > 10 or info["generation"] == 2:
        _say(f"gen{info['generation']} {ms:.1f} ms collected {info['collected']}")


gc.freeze = _logged_freeze
gc.callbacks.append(_pause)
