"""The command lines: a recipe file's entry point (recipe.py: `accelerate launch recipes/X.py`), the `shardtune`
command (main.py) and its subcommands (plan, doctor, bench, submit/status/logs/cancel), sweeps (sweep.py)."""
