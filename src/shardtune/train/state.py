"""TrainState: the loop's own counters, a Stateful object that the checkpoint manager saves beside the adapters,
the optimizer and the scheduler (its fields at the top of a checkpoint's train_state.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding tokens trained on, all ranks
    first_eval: dict | None = None  # the held-out loss before training (kept for the summary)
    eval_pending: bool = False  # an eval due at `step` that a stop left to the next start
    data_fingerprint: str | None = None  # of the training rows (checkpoint.resume.check_same_data)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's train_state.json (older ones lack some fields: their defaults)."""
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, f.default))
