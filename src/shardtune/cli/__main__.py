"""`python -m shardtune.cli ...`: the same as the `shardtune` command."""

import sys

from shardtune.cli.main import main

sys.exit(main())
