"""The errors shardtune reports to the user in one line, and the exit codes that tell a launcher what to do.

An input error (ConfigError, DataError) fails the same way on every start: the run exits EXIT_USAGE and
status.json records `input_error`, so nothing requeues it. DataUnavailable is a fault outside the input (the
hub or the storage down): exit 1, which launchers and `shardtune submit` retry.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: what is wrong, where it came from, how to fix it."""


class DataError(ValueError):
    """Bad input data, with the file (or dataset), the row and the column."""


class DataUnavailable(RuntimeError):
    """The data could not be read for a reason outside it (the hub or the network down, a storage fault)."""


class DiskFull(RuntimeError):
    """No room on the disk for a checkpoint: the directory, the space it needs and the space free, the fix."""


# The errors a run reports in one line (no traceback); of them, those every start would repeat.
REPORTED = (ConfigError, DataError, DataUnavailable, DiskFull)
INPUT_ERRORS = (ConfigError, DataError)

EXIT_USAGE = 2  # a configuration or data error: nothing was trained, fix the input and run again
# EX_TEMPFAIL from sysexits.h: "checkpointed; run the same command again to continue". Each training process
# exits with it; torchrun and accelerate launch report any non-zero worker exit as 1, so launchers read the
# run directory's status.json ("status": "interrupted") to decide to requeue.
EXIT_REQUEUE = 75


def is_input_error(e: BaseException) -> bool:
    """Whether every start would fail the same way (not worth a restart or a requeue)."""
    return isinstance(e, INPUT_ERRORS)
