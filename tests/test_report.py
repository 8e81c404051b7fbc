"""The end-of-run score of generated samples: exact match where the answers are short, ROUGE-L for free text,
in summary.json's fields, the printed summary and a sweep's table."""

import json

import pytest

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


def run_samples(tok, tmp_path, rows, answers, **eval_settings):
    """report.samples over `rows` (alpaca, the last 2 the folder's test split) with `answers` as generated."""
    folder = tmp_path / "rows"
    folder.mkdir(exist_ok=True)
    for name, part in (("train", rows[:-2]), ("test", rows[-2:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    data = build_data(DataConfig(source=str(folder)), tok, seed=0)
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
    saved = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["rouge_l"] for r in saved if "reference" in r] == [r["rouge_l"] for r in scored]


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
