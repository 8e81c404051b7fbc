"""The end-of-run score of generated samples: exact match where the answers are short, ROUGE-L for free text,
in summary.json's fields, the printed summary and a sweep's table."""

import contextlib
import json

import pytest
import torch

from shardtune.cli.sweep import format_table
from shardtune.config import DataConfig, EvalConfig
from shardtune.data.loader import build_data
from shardtune.model.tokenizer import build_tiny_tokenizer, prepare_tokenizer
from shardtune.train import report

LAMP = "A brass desk lamp with a linen shade and a warm dimmable light for late reading."
CHAIR = "An oak chair with a woven seat, light enough to carry and sturdy enough for every day."


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tiny_tokenizer(), None, None)


class Sink:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text


def folder_data(tok, tmp_path, rows):
    """`rows` (alpaca) as a folder whose test split is the last 2."""
    folder = tmp_path / "rows"
    folder.mkdir(exist_ok=True)
    for name, part in (("train", rows[:-2]), ("test", rows[-2:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return build_data(DataConfig(source=str(folder)), tok, seed=0)


def run_samples(tok, tmp_path, rows, answers, **eval_settings):
    """report.samples over `rows` (alpaca, the last 2 the folder's test split) with `answers` as generated."""
    data = folder_data(tok, tmp_path, rows)
    refs = {data.formatter.prompt(r, i): r["output"] for i, r in enumerate(data.eval_rows)}

    def generate(prompts, max_new_tokens, batch_size):
        return [answers[refs[p]] if p in refs else "an answer" for p in prompts]

    ecfg = EvalConfig(samples=2, questions=["Anything?"], **eval_settings)
    samples = report.samples(ecfg, generate, data)
    summary = {
        "first_eval_loss": 2.0,
        "final_eval_loss": 1.0,
        "adapter": "adapter",
        "base": None,
        "last_checkpoint": "ckpt",
    }
    sink = Sink()
    report.print_summary(sink, summary, tmp_path, None, samples, show=2)
    return samples, sink.text


def test_free_text_is_scored_by_rouge_l_not_exact_match(tok, tmp_path):
    """Product descriptions (answers of many words): no "exact match 0/2", a ROUGE-L per row and their mean."""
    rows = [{"instruction": f"Describe product {i}", "output": [LAMP, CHAIR][i % 2]} for i in range(6)]
    answers = {LAMP: "A brass lamp with a linen shade for reading.", CHAIR: CHAIR}
    samples, text = run_samples(tok, tmp_path, rows, answers)
    assert samples["metric"] == "rouge_l" and samples["exact_match"] is None
    scored = [r for r in samples["records"] if "reference" in r]
    by_ref = {r["reference"].strip(): r["rouge_l"] for r in scored}
    assert by_ref[CHAIR] == 1.0 and 0.4 < by_ref[LAMP] < 0.9
    assert samples["rouge_l"] == pytest.approx(sum(by_ref.values()) / 2)
    assert f"ROUGE-L on 2 held-out rows: {samples['rouge_l']:.3f}" in text and "exact match" not in text
    assert "ROUGE-L 1.00" in text  # the sample lines show each row's score


def test_short_answers_are_scored_by_exact_match(tok, tmp_path):
    rows = [
        {"instruction": f"Capital number {i}?", "output": ["Paris", "New Delhi"][i % 2]} for i in range(6)
    ]
    samples, text = run_samples(tok, tmp_path, rows, {"Paris": "Paris", "New Delhi": "Delhi"})
    assert samples["metric"] == "exact_match" and samples["exact_match"] == 0.5 and samples["rouge_l"] is None
    assert "exact match on 2 held-out rows: 1/2 (50.0%)" in text and "ROUGE-L" not in text
    # eval.metric chooses otherwise, or nothing
    samples, text = run_samples(
        tok, tmp_path, rows, {"Paris": "Paris", "New Delhi": "Delhi"}, metric="rouge_l"
    )
    assert samples["metric"] == "rouge_l" and samples["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)
    samples, text = run_samples(tok, tmp_path, rows, {"Paris": "Paris", "New Delhi": "Delhi"}, metric="none")
    assert samples["metric"] is None and samples["exact_match"] is None and "held-out rows:" not in text


def test_metric_choice_and_rouge_l_values():
    assert report.metric_for("auto", ["abc", "one two three four five"]) == "exact_match"
    assert report.metric_for("auto", ["abc", "one two three four five six"]) == "rouge_l"
    assert report.metric_for("auto", []) is None and report.metric_for("exact_match", [LAMP]) == "exact_match"
    # rouge-score's reference value (F 0.7692), and words of any script, not ASCII only
    assert report.rouge_l("The cat was sitting on the mat", "The cat sat on the mat.") == pytest.approx(
        0.7692, abs=1e-4
    )
    assert report.rouge_l("Кошка сидит на ковре", "Кошка сидит на полу") == pytest.approx(0.75)
    assert report.rouge_l("nothing shared", "entirely different") == 0.0


def test_the_sweep_table_shows_the_samples_score():
    base = {"trainable_params": 1000, "first_eval_loss": 2.0, "final_eval_loss": 1.0}
    grid = {"lora.r": [8, 16]}
    rouge = [
        {**base, "lora.r": r, "sample_metric": "rouge_l", "rouge_l": s} for r, s in ((8, 0.25), (16, 0.5))
    ]
    table = format_table(grid, rouge)
    assert "| ROUGE-L |" in table.splitlines()[0] and "| 0.500" in table
    # a summary from before eval.metric (exact_match alone), and a run without samples
    old = [{**base, "lora.r": 8, "exact_match": 0.75}, {**base, "lora.r": 16, "exact_match": None}]
    lines = format_table(grid, old).splitlines()
    assert "exact match" in lines[0] and "75.0%" in lines[2] and lines[3].rstrip(" |").endswith("-")
    assert "samples score" in format_table(grid, [rouge[0], old[0]]).splitlines()[0]
    assert "score" not in format_table(grid, [{**base, "lora.r": 8, "exact_match": None}])
    # the base model's score (the adapters off) beside the tuned model's
    both = [{**r, "base_rouge_l": 0.125} for r in rouge]
    lines = format_table(grid, both).splitlines()
    assert "| base ROUGE-L | ROUGE-L |" in lines[0] and "| 0.125        | 0.500" in lines[3]
    assert "base" not in format_table(grid, rouge).splitlines()[0]  # summaries from before the base's samples


class RecordingSink(Sink):
    def __init__(self):
        super().__init__()
        self.notes = []

    def note(self, rec):
        self.notes.append(rec)


class Model:
    """Stands in for the run's generation: the base answers 'zzz', the tuned model the reference; counts calls."""

    def __init__(self, refs):
        self.refs, self.off, self.calls = refs, False, []

    def generate(self, prompts, max_new_tokens, batch_size):
        self.calls.append(("off" if self.off else "on", len(prompts)))
        return ["zzz" if self.off else self.refs.get(p, "an answer") for p in prompts]

    @contextlib.contextmanager
    def adapters_off(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False


def test_base_and_tuned_samples_side_by_side(tok, tmp_path):
    """The base model's samples once at the start (the adapters off, questions too), the tuned model's at every
    eval.samples_every-th eval (rows only, the score noted in metrics.jsonl) and at the end, in generations.jsonl
    by step and adapter; the summary prints base and tuned for each shown row, and both scores. A resumed run keeps
    what was written up to its checkpoint, the base's samples included (not generated again); a fresh start
    writes the file anew."""
    from shardtune.parallel.distributed import DistInfo
    from shardtune.train.generations import Generations

    rows = [{"instruction": f"Capital number {i}?", "output": ["Paris", "Rome"][i % 2]} for i in range(6)]
    data = folder_data(tok, tmp_path, rows)
    model = Model({data.formatter.prompt(r, i): r["output"] for i, r in enumerate(data.eval_rows)})
    ecfg = EvalConfig(samples=2, questions=["Anything?"], every=10, samples_every=2)
    sink = RecordingSink()
    dist = DistInfo.alone(torch.device("cpu"))

    def generations(start_step, run_sink=sink):
        return Generations(
            ecfg, data, tmp_path, dist, run_sink, start_step, model.generate, model.adapters_off
        )

    gens = generations(0)
    gens.start(0, starting_adapter=False)
    for step in (10, 20, 30, 40):
        gens.at_eval(step)
    assert model.calls == [("off", 3), ("on", 2), ("on", 2)]  # base: rows + question; evals 20 and 40
    assert sink.notes == [{"step": 20, "samples_exact_match": 1.0}, {"step": 40, "samples_exact_match": 1.0}]
    assert "samples @ step 20 (adapters on): exact match on 2 held-out rows 2/2 (100.0%)" in sink.text
    assert "the base model 0/2 (0.0%)" in sink.text
    samples = gens.final(50)
    saved = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    points = [(r["step"], r["adapter"], "question" in r) for r in saved]
    assert points == [(0, "off", False)] * 2 + [(0, "off", True)] + [(20, "on", False)] * 2 + [
        (40, "on", False)
    ] * 2 + [(50, "on", False)] * 2 + [(50, "on", True)]
    assert {r["generated"] for r in saved if r["adapter"] == "off"} == {"zzz"}
    assert samples["exact_match"] == 1.0 and samples["base"]["exact_match"] == 0.0
    text = Sink()
    summary = {
        "first_eval_loss": 2.0,
        "final_eval_loss": 1.0,
        "adapter": "a",
        "base": None,
        "last_checkpoint": "c",
    }
    report.print_summary(text, summary, tmp_path, None, samples, show=2)
    assert (
        "base : 'zzz'" in text.text
        and "tuned: 'Paris'" in text.text
        and "base: the adapters off" in text.text
    )
    assert "exact match on 2 held-out rows: 2/2 (100.0%); the base model 0/2 (0.0%)" in text.text
    assert "Q: Anything?\n  base : zzz\n  tuned: an answer" in text.text

    # resumed from step 20: what came after it is dropped, the base's samples are kept and not generated again
    model.calls.clear()
    again = generations(20, RecordingSink())
    again.start(20, starting_adapter=False)
    again.at_eval(40)
    assert model.calls == [("on", 2)] and again.base["exact_match"] == 0.0
    saved = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["adapter"]) for r in saved].count((40, "on")) == 2 and max(
        r["step"] for r in saved
    ) == 40
    # the end of a finished run, started again: its samples written once
    again.final(50), again.final(50)
    saved = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["adapter"]) for r in saved].count((50, "on")) == 3
    # a fresh start (no checkpoint) generates and writes everything anew
    model.calls.clear()
    generations(0).start(0, starting_adapter=True)
    saved = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert model.calls == [("off", 3), ("on", 2)] and {r["step"] for r in saved} == {0}
