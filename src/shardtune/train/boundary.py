"""What happens at a step boundary: evaluate now, leave a due eval to the next start, save, stop.

Decided from the step just done, the run's last step, the eval and save cadence, and whether any rank was
signalled (or the STOP file appeared) or the save timer ran out: facts every rank has agreed on in one
all-reduce, so every rank takes the same decision and no rank is left waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Boundary:
    eval_now: bool  # the held-out loss, before anything else
    eval_pending: bool  # an eval due now, left to the next start (saved in the checkpoint)
    save: bool
    stop: bool  # after the save: the run ends here (interrupted), to be continued by the same command


def decide(
    done: int,
    total: int,
    eval_every: int,
    save_every: int,
    signalled: bool,
    timed: bool,
    evaluated: bool = False,
) -> Boundary:
    """The boundary after step `done` of `total`. A stop saves first (a signal's grace is short) and leaves a
    due eval to the next start; the last step's eval and save are the run's end's, not the loop's.
    `evaluated`: the eval due here has run already (a signal that came during it is decided again)."""
    eval_due = bool(eval_every) and done % eval_every == 0 and done != total and not evaluated
    periodic = bool(save_every) and done % save_every == 0
    return Boundary(
        eval_now=eval_due and not signalled,
        eval_pending=eval_due and signalled,
        save=signalled or timed or periodic,
        stop=signalled and done < total,
    )
