"""Preference rows (data.format=preference): the layouts TRL and the hub's preference sets use, labels on the
responses only, both responses of a pair in one batch, and every bad row named by file and row."""

import json

import numpy as np
import pytest

from shardtune.config import DataConfig, GeneratedTaskConfig
from shardtune.data.formats import IGNORE_INDEX, RowFormatter, detect_format, encode
from shardtune.data.loader import GlobalBatchSampler, build_data, collate
from shardtune.data.tasks import generate_rows
from shardtune.errors import DataError
from shardtune.model.tokenizer import build_tiny_tokenizer, prepare_tokenizer


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tiny_tokenizer(), None, None)


def trained_text(tok, ids, mask) -> str:
    return tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])


def pair(tok, row, **kw):
    enc = encode(RowFormatter("preference", tok, "pairs.jsonl", **kw), [row], max_len=512, append_eos=True)
    assert len(enc) == 1 and enc.group == 2
    return enc.sequences([0])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_auto_detects_preference_before_chat():
    """The hub's sets carry `messages` (and score columns) beside chosen and rejected."""
    h4 = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]
    assert detect_format(h4, {}, "x") == "preference"
    assert detect_format(["chosen", "rejected"], {}, "x") == "preference"
    assert detect_format(["messages"], {}, "x") == "chat"


def test_plain_pairs_train_the_responses_and_eos_only(tok):
    (c_ids, c_mask), (r_ids, r_mask) = pair(
        tok, {"prompt": "Sort: c a b\n", "chosen": "a b c", "rejected": "a c b"}
    )
    assert trained_text(tok, c_ids, c_mask) == "a b c</s>" and trained_text(tok, r_ids, r_mask) == "a c b</s>"
    assert not c_mask[0]
    # the same prompt tokens in front of both
    n = int(np.argmax(c_mask))
    assert list(c_ids[:n]) == list(r_ids[:n]) and not c_mask[:n].any() and not r_mask[:n].any()


@pytest.mark.parametrize(
    "row",
    [
        # explicit: prompt turns, then the responses alone
        {"prompt": [user("Sort: c a b")], "chosen": [assistant("a b c")], "rejected": [assistant("a c b")]},
        # a text prompt with responses alone
        {"prompt": "Sort: c a b", "chosen": [assistant("a b c")], "rejected": [assistant("a c b")]},
        # whole conversations (argilla's), the prompt being the turns they share
        {
            "chosen": [user("Sort: c a b"), assistant("a b c")],
            "rejected": [user("Sort: c a b"), assistant("a c b")],
        },
        # HuggingFaceH4/ultrafeedback_binarized: a text prompt beside whole conversations, messages, scores
        {
            "prompt": "Sort: c a b",
            "prompt_id": "x1",
            "chosen": [user("Sort: c a b"), assistant("a b c")],
            "rejected": [user("Sort: c a b"), assistant("a c b")],
            "messages": [user("Sort: c a b"), assistant("a b c")],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        },
    ],
    ids=["explicit", "text-prompt", "whole-conversations", "ultrafeedback-binarized"],
)
def test_conversational_layouts_render_alike(tok, row):
    (c_ids, c_mask), (r_ids, r_mask) = pair(tok, row)
    assert trained_text(tok, c_ids, c_mask) == " a b c</s>"  # the template's turn, up to its EOS
    assert trained_text(tok, r_ids, r_mask) == " a c b</s>"
    assert tok.decode(c_ids).endswith("Human: Sort: c a b</s>\n\nAssistant: a b c</s>")
    f = RowFormatter("preference", tok, "x")
    assert f.prompt(row, 0).endswith("Assistant: ") and f.reference(row, 0) == "a b c"
    assert f.rejected(row, 0) == "a c b"


def test_a_batch_of_pairs_holds_every_chosen_then_every_rejected(tok, tmp_path):
    rows = [
        {"prompt": f"Sort: {w}\n", "chosen": " ".join(sorted(w)), "rejected": w}
        for w in ("cab", "dcb", "bca")
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    data = build_data(DataConfig(source=str(f), test_size=2), tok, seed=0, objective="dpo")
    assert data.formatter.fmt == "preference" and len(data.train) == 10 and len(data.eval) == 2
    seqs = data.train.sequences([3, 5])
    assert [len(s[0]) for s in seqs] == [len(data.train.sequence(k)[0]) for k in (6, 10, 7, 11)]
    batch = collate(seqs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    labelled = [tok.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in batch["labels"]]
    assert all(x.endswith("</s>") for x in labelled)
    assert data.train.lengths().tolist()[3] == sum(len(data.train.sequence(k)[0]) for k in (6, 7))
    # the sampler counts pairs as rows
    sampler = GlobalBatchSampler(len(data.train), 4, 2, 1, 0, 0)
    assert sampler.steps_per_epoch == 2 and all(len(m) == 2 for m in sampler.micro_batches(0))


def write(tmp_path, rows, name="pairs.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def build(tok, f, objective="dpo", **kw):
    return build_data(DataConfig(source=str(f), test_size=1, **kw), tok, seed=0, objective=objective)


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "row 3: column 'chosen' is empty (null)"),
        ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]}, "row 3: 'chosen' and 'rejected' must both be"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "row 3: plain-text 'chosen' and 'rejected' need a 'prompt'"),
        ({"prompt": "p", "chosen": [{"role": "bot", "content": "a"}], "rejected": [assistant("b")]},
         "row 3: column 'chosen', message 0: expected {role"),
        ({"chosen": [user("p"), assistant("a")], "rejected": [user("q"), assistant("b")]},
         "row 3: 'chosen' and 'rejected' share no prompt turn"),
        ({"chosen": [user("p"), assistant("a")], "rejected": [user("p")]},
         "row 3: column 'rejected' has no assistant turn after"),
    ],
    ids=["null", "mixed", "no-prompt", "bad-role", "no-shared-prompt", "no-response"],
)  # fmt: skip
def test_bad_rows_are_named_by_file_and_row(tok, tmp_path, bad, said):
    f = write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        build(tok, f)
    assert str(f) in str(e.value) and said in str(e.value), str(e.value)


def test_a_missing_column_names_the_fix(tok, tmp_path):
    f = write(tmp_path, [{"prompt": "p", "chosen": "a", "worse": "b"}] * 3)
    with pytest.raises(DataError, match=r"missing column 'rejected' \(format 'preference' needs it; map"):
        build(tok, f, format="preference")


def test_empty_responses_and_pairs_that_prefer_nothing_are_left_out_and_counted(tok, tmp_path):
    rows = [
        GOOD,
        {"prompt": "p", "chosen": " ", "rejected": "b"},
        GOOD,
        {"prompt": "p", "chosen": "a", "rejected": "a"},
    ]
    data = build(tok, write(tmp_path, rows * 2))
    assert len(data.train) + len(data.eval) == 4
    assert len(data.train.empty) + len(data.eval.empty) == 4
    assert (
        "the chosen response is empty (whitespace only)" in data.train.empty_example + data.eval.empty_example
    )


def test_the_objective_and_the_rows_must_agree(tok, tmp_path):
    f = write(tmp_path, [GOOD] * 3)
    with pytest.raises(DataError, match=r"preference rows .* train with objective.name=dpo or orpo"):
        build(tok, f, objective="sft")
    g = write(tmp_path, [{"instruction": "i", "output": "o"}] * 3, "sft.jsonl")
    with pytest.raises(DataError, match=r"objective.name=orpo trains on preference rows .* format 'alpaca'"):
        build(tok, g, objective="orpo")


def test_field_templates_build_a_pair_from_other_columns(tok, tmp_path):
    """argilla/ultrafeedback-binarized-preferences-cleaned style: instruction, chosen_response, rejected_response."""
    f = write(
        tmp_path,
        [{"instruction": "sort c a b", "chosen_response": "a b c", "rejected_response": "c a b"}] * 3,
    )
    fields = {"prompt": "{instruction}\n", "chosen": "{chosen_response}", "rejected": "{rejected_response}"}
    data = build(tok, f, format="preference", fields=fields)
    (ids, mask), _ = data.train.sequences([0])
    assert trained_text(tok, ids, mask) == "a b c</s>"


def test_generated_pairs_prefer_the_answer_to_a_near_miss():
    cfg = GeneratedTaskConfig(rows=200)
    rows = generate_rows(cfg, seed=3, pairs=True)
    assert rows == generate_rows(cfg, seed=3, pairs=True)
    for r in rows:
        letters = r["prompt"].split("### Instruction:\n")[1].split("\n")[0].split(": ")[1].split()
        chosen, rejected = r["chosen"].split(), r["rejected"].split()
        assert sorted(chosen) == sorted(letters) == sorted(rejected) and chosen != rejected
        assert chosen in (sorted(letters), sorted(letters, reverse=True))
        diff = [i for i in range(len(chosen)) if chosen[i] != rejected[i]]
        assert len(diff) == 2 and diff[1] == diff[0] + 1  # two neighbours swapped
