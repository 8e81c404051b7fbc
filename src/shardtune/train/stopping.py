"""Stopping on a signal without losing work.

SIGTERM (a preemption, `scancel`, torchrun forwarding its own) and SIGUSR1 (SLURM's `--signal=USR1@N` before
the time limit) only set a flag; so does a file named STOP in the run directory. At every step boundary the ranks agree, with one all-reduce, on whether any
of them was signalled; if so all of them stop after that same step (no rank is left waiting in a
collective), save a checkpoint and exit with EXIT_REQUEUE. A second signal while saving only sets the flag
again. Running the same command again (train.resume=auto) continues exactly where it stopped.
"""

from __future__ import annotations

import os
import signal

from shardtune.errors import EXIT_REQUEUE
from shardtune.parallel.distributed import launcher_restarts


def stopped_exit_code(is_main: bool) -> int:
    """What a process exits with once its run stopped on request and saved: EXIT_REQUEUE from the main process,
    0 from the others (under slurm/train.sh srun ends every node's launcher at the first non-zero exit, which
    must not cut rank 0 before it has recorded the stop). Under a launcher that restarts failed workers
    (`torchrun --max-restarts N`, N > 0) every process exits 0: a non-zero code would make it start the run
    again at once and train on past the stop that was asked for; status.json says "interrupted"."""
    return EXIT_REQUEUE if is_main and launcher_restarts() == 0 else 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# `touch RUN_DIR/STOP` asks the same of a run without a signal: from a shell, or from slurm/train.sh, whose
# signal would otherwise have to pass through srun and torchrun (which drop it while the processes start,
# and treat it as their own shutdown). Checked by rank 0 at every step boundary; removed once acted on.
STOP_FILE = "STOP"

# A Python command line that starts the rest of its arguments as a Python with SIGUSR1/SIGUSR2 blocked. Slurm
# may send a time-limit signal up to a minute before it is due, and a preemption's at any time, so it can
# reach a task while Python is still importing, before any handler exists; their default action kills the
# task (and its peers wait for it until the process group's timeout). Blocked, the signal stays pending
# until StopRequest takes it. This first Python runs without site (-S): a few milliseconds, not seconds.
BLOCKED_START = (
    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class StopRequest:
    """Records the first stop signal this process receives while installed (a context manager).

    Entering also unblocks its signals: a process started with them blocked (`shardtune submit`'s tasks, see
    BLOCKED_START) receives here the one that arrived while it was starting, instead of dying of it.

    Leaving restores the handlers it replaced, except for the signals in `ignore_after`, which are ignored from
    then on: for a task whose run is over, a late time-limit signal is moot, and neither the restored handler
    nor, while Python shuts down (it resets its handlers to the default), the default action may act on it.
    Ignored, not blocked: a mask is per thread, and threads started during the run (gloo's, a data loader's)
    inherited the unblocked one, so the kernel would deliver the signal to one of them."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
        ignore_after: tuple[signal.Signals, ...] = (),
    ):
        self.signals, self.ignore_after = signals, ignore_after
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            # no logging from a signal handler; one write is safe
            os.write(
                2,
                f"[shardtune] got {signal.Signals(signum).name}: stopping after this step, saving\n".encode(),
            )

    def __enter__(self) -> StopRequest:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)  # a pending one is handled right here
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if s in self.ignore_after else handler)
        self._previous.clear()
