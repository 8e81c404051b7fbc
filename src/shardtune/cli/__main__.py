"""`python -m shardtune.cli ...`: the same as the `shardtune` command."""

import os
import sys

from shardtune.cli.main import main

code = main()
if os.environ.get("TORCHELASTIC_RUN_ID"):  # a launcher's worker (doctor --numerics): distributed.exit_process
    from shardtune.parallel.distributed import exit_process

    exit_process(code)
sys.exit(code)
