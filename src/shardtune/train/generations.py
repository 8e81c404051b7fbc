"""Before and after: what the base model writes and what the tuned one writes, for the same held-out prompts.

    start        the base model (PEFT's disable_adapter(): the adapters off, in every process), once: the
                 eval.samples held-out rows and eval.questions
    evals        the tuned model (the adapters on), every eval.samples_every-th eval: the held-out rows
    end          the tuned model: the rows and the questions

Each point is written to generations.jsonl as it is generated, a record per prompt: the step, whether the adapters
were on, the prompt, the whole generated text, the reference and its score (eval.metric); the score of an eval's
samples goes to metrics.jsonl too. Generation is greedy: it draws nothing from the random state, so the training
is the same with or without it. A resumed run keeps what was written up to its checkpoint (the base's samples
included: they are not generated again) and drops the rest, as metrics.jsonl does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from shardtune.files import write_atomic
from shardtune.parallel.distributed import DistInfo, broadcast_object
from shardtune.train import report

if TYPE_CHECKING:
    from shardtune.config import EvalConfig
    from shardtune.data.loader import Data
    from shardtune.observability.metrics import MetricsSink

log = logging.getLogger(__name__)

GENERATIONS = "generations.jsonl"


class Generations:
    """The samples of one run, base and tuned, in generations.jsonl. Every rank calls every method (generation is
    collective); rank 0 writes. `generate(prompts, max_new_tokens, batch_size)`: the run's greedy generation;
    `adapters_off()`: a context in which the model is the base."""

    def __init__(
        self,
        ecfg: EvalConfig,
        data: Data,
        run_dir: Path,
        dist: DistInfo,
        sink: MetricsSink,
        start_step: int,
        generate: Callable[[list[str], int, int], list[str]],
        adapters_off: Callable[[], AbstractContextManager],
    ):
        self.ecfg, self.sink, self.is_main = ecfg, sink, dist.is_main
        self.generate_fn, self.adapters_off = generate, adapters_off
        self.prompts = report.Prompts.of(ecfg, data)
        self.metric = report.metric_for(ecfg.metric, self.prompts.references)
        self.path = run_dir / GENERATIONS
        kept = records_up_to(self.path, start_step) if self.is_main else []
        base = [r for r in kept if r.get("adapter") == "off"]
        # rank 0 read the file: every rank must agree on whether to generate the base's samples
        self.base_done = broadcast_object(bool(base))
        self.base = report.tally(base, self.metric) if base else None

    @property
    def rows(self) -> int:
        return len(self.prompts.prompts)

    def _generate(self, step: int, adapters: bool, questions: bool) -> dict:
        p = self.prompts
        prompts = p.prompts + (p.question_prompts if questions else [])
        if adapters:
            outputs = self.generate_fn(prompts, self.ecfg.max_new_tokens, self.ecfg.batch_size)
        else:
            with self.adapters_off():
                outputs = self.generate_fn(prompts, self.ecfg.max_new_tokens, self.ecfg.batch_size)
        done = report.scored(self.ecfg, p, outputs)
        if self.is_main:
            point = {"step": step, "adapter": "on" if adapters else "off"}
            _drop_point(self.path, point)  # (the end of a finished run started again: written once)
            with self.path.open("a") as f:
                f.writelines(json.dumps(point | rec) + "\n" for rec in done["records"])
        return done

    def start(self, step: int, starting_adapter: bool) -> None:
        """The base model's samples, unless an earlier start of the run wrote them; at step 0 with an adapter to
        start from (model.adapter), also the tuned model's: that adapter's own."""
        if not self.base_done and (self.rows or self.prompts.questions):
            self.base = self._generate(step, adapters=False, questions=True)
            self.base_done = True
            self._say(step, self.base, "the base model: adapters off")
        if step == 0 and starting_adapter and self.rows:
            self._say(step, self._generate(step, adapters=True, questions=False), "the starting adapter")

    def at_eval(self, step: int) -> None:
        """The tuned model's samples at the eval after `step`, if this eval is one of every eval.samples_every."""
        every, k = self.ecfg.every, self.ecfg.samples_every
        if not (self.rows and every and k) or step == 0 or (step // every) % k:
            return
        done = self._generate(step, adapters=True, questions=False)
        self._say(step, done, "adapters on")
        if self.is_main and self.metric:
            self.sink.note({"step": step, f"samples_{self.metric}": done[self.metric]})

    def final(self, step: int) -> dict:
        """The tuned model's samples at the end (rows and questions), with the base's (samples["base"])."""
        done = self._generate(step, adapters=True, questions=True)
        return {**done, "base": self.base}

    def _say(self, step: int, done: dict, whose: str) -> None:
        if not (self.metric and done["n"]):
            return
        name = report.METRIC_NAMES[self.metric]
        base = (
            f", the base model {report.tally_text(self.base)}" if self.base and self.base is not done else ""
        )
        first = done["records"][0]
        self.sink.write(
            f"samples @ step {step} ({whose}): {name} on {done['n']} held-out rows {report.tally_text(done)}{base}; "
            f"e.g. {report.instruction(first['prompt'])[:50]!r} -> {first['generated'].strip()[:50]!r}"
        )


def records_up_to(path: Path, step: int) -> list[dict]:
    """generations.jsonl's records up to checkpoint `step` (none for a fresh start), the file rewritten without the
    rest: records past it, a line cut short by a crash mid-write, and records written before the file said
    whether the adapters were on."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    kept = []
    for line in lines if step else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "adapter" in rec and rec.get("step", -1) <= step:
            kept.append(rec)
    if len(kept) < len(lines):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        log.info("%s: %d record(s) past step %d dropped", GENERATIONS, len(lines) - len(kept), step)
    return kept


def _drop_point(path: Path, point: dict) -> None:
    """generations.jsonl without the records of `point` (a step and adapters on or off), if it has any."""
    if not path.is_file():
        return

    def of(line: str) -> dict | None:
        try:
            return {k: json.loads(line).get(k) for k in point}
        except (json.JSONDecodeError, AttributeError):
            return None

    lines = path.read_text().splitlines()
    kept = [line for line in lines if of(line) != point]
    if len(kept) < len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept).encode())
