"""Data: formats, completion-only label positions, truncation, sources, and every bad-input error."""

import json

import numpy as np
import pandas as pd
import pytest

from shardtune.config import Config, DataConfig, GeneratedTaskConfig
from shardtune.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    RowFormatter,
    detect_format,
    encode,
)
from shardtune.data.loader import (
    GlobalBatchSampler,
    build_data,
    collate,
    eval_batches,
    padding_advice,
    padding_share,
    token_micro_batches,
)
from shardtune.data.tasks import generate_rows
from shardtune.errors import ConfigError, DataError, DataUnavailable
from shardtune.model.tokenizer import build_tiny_tokenizer, prepare_tokenizer


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tiny_tokenizer(), None, None)


def trained_runs(tok, ids, mask):
    """The trained tokens as decoded text, one string per contiguous run."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def encode_one(tok, fmt, row, **kw):
    enc = encode(RowFormatter(fmt, tok, "rows.jsonl", **kw), [row], max_len=512, append_eos=True)
    return enc.row(0)


def test_alpaca_labels_exactly_the_response_and_eos(tok):
    for row, template in [
        ({"instruction": "Sort the letters: c a b", "input": "", "output": "a b c"}, ALPACA_PROMPT_NO_INPUT),
        ({"instruction": "Sort the letters.", "input": "c a b", "output": "a b c"}, ALPACA_PROMPT),
    ]:
        ids, mask = encode_one(tok, "alpaca", row)
        prompt = template.format(instruction=row["instruction"], input=row["input"])
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert not mask[:n_prompt].any() and mask[n_prompt:].all()
        assert tok.decode(ids[n_prompt:].tolist()) == "a b c</s>"
        assert ids[-1] == tok.eos_token_id
        # the collated labels are the next tokens exactly at those positions
        batch = collate([(ids, mask)], tok.pad_token_id)
        labels = batch["labels"][0]
        positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert positions == list(range(n_prompt - 1, len(ids) - 1))
        assert labels[positions].tolist() == ids[n_prompt:].tolist()


def test_alpaca_response_suffix_and_field_templates(tok):
    row = {"product": "Lamp", "category": "Lighting", "description": "A bright lamp."}
    fields = {
        "instruction": "Create a detailed description for the following product: {product}, "
        "belonging to category: {category}",
        "output": "{description}",
    }
    ids, mask = encode_one(tok, "alpaca", row, fields=fields, response_suffix="\n\n### End")
    assert trained_runs(tok, ids, mask) == ["A bright lamp.\n\n### End</s>"]
    text = tok.decode(ids.tolist())
    assert "following product: Lamp, belonging to category: Lighting" in text


def test_prompt_completion_and_text(tok):
    ids, mask = encode_one(tok, "prompt_completion", {"prompt": "Q: sort c a b\nA:", "completion": " a b c"})
    assert trained_runs(tok, ids, mask) == [" a b c</s>"]
    ids, mask = encode_one(tok, "text", {"text": "the letters a b c"})
    assert mask.all() and tok.decode(ids.tolist()) == "the letters a b c</s>"


def test_completion_only_off_trains_the_prompt_too(tok):
    _, mask = encode_one(tok, "alpaca", {"instruction": "x", "output": "y"}, completion_only=False)
    assert mask.all()


def test_chat_labels_every_assistant_turn_only(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort c a b"},
        {"role": "assistant", "content": "a b c"},
        {"role": "user", "content": "And b a?"},
        {"role": "assistant", "content": "a b"},
    ]
    ids, mask = encode_one(tok, "chat", {"messages": messages})
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids.tolist()) == full
    # the space after "Assistant:" merges with the first word, so it is part of the labelled token
    assert trained_runs(tok, ids, mask) == [" a b c</s>", " a b</s>"]


def test_truncation_counts_and_drops_rows_without_response(tok):
    f = RowFormatter("alpaca", tok, "rows.jsonl")
    rows = [
        {"instruction": "Sort the letters: " + "a " * 40, "output": "a"},
        {"instruction": "Sort the letters: c b", "output": "b c " * 30},
    ]
    enc = encode(f, rows, max_len=40, append_eos=True)
    assert enc.truncated == 2 and enc.dropped == 1 and len(enc) == 1
    assert enc.lengths().tolist() == [40]


def test_detect_format():
    assert detect_format(["messages", "prompt"], {}, "x") == "chat"
    assert detect_format(["instruction", "input", "output"], {}, "x") == "alpaca"
    assert (
        detect_format(
            ["product", "category", "description", "text"],
            {"instruction": "{product}", "output": "{description}"},
            "x",
        )
        == "alpaca"
    )
    assert detect_format(["prompt", "completion"], {}, "x") == "prompt_completion"
    with pytest.raises(DataError, match="cannot tell the format from its columns \\(question, answer\\)"):
        detect_format(["question", "answer"], {}, "data.jsonl")


# --------------------------------------------------------------------------------------- bad input
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tok, source, **kw):
    cfg = DataConfig(source=str(source), test_size=1, **kw)
    return build_data(cfg, tok, seed=0)


def test_missing_column_names_file_column_and_fix(tok, tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "response": "b"}] * 3)
    with pytest.raises(DataError) as e:
        build(tok, f, format="alpaca")
    msg = str(e.value)
    assert str(f) in msg and "missing column 'output'" in msg and "data.fields.output=" in msg
    assert "Columns: instruction, response" in msg


def test_bad_rows_name_file_row_and_column(tok, tmp_path):
    f = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a", "output": None}],
    )
    with pytest.raises(DataError, match=r"rows.jsonl row 4: column 'output' is empty \(null\)"):
        build(tok, f)
    f = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 2,
    )
    with pytest.raises(DataError, match=r"chat.jsonl row \d: column 'messages', message 1: expected \{role"):
        build(tok, f)
    f = write_jsonl(tmp_path / "chat2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(DataError, match=r"row \d: column 'messages' has no assistant message"):
        build(tok, f)
    f = write_jsonl(tmp_path / "tmpl.jsonl", [{"product": "x", "description": "y"}] * 2)
    with pytest.raises(DataError, match=r"missing column 'category' \(data\.fields\.instruction="):
        build(
            tok, f, format="alpaca", fields={"instruction": "{product} {category}", "output": "{description}"}
        )


def test_number_where_text_is_expected(tok, tmp_path):
    f = tmp_path / "rows.csv"
    pd.DataFrame({"prompt": ["a", "b"], "completion": [1, 2]}).to_csv(f, index=False)
    with pytest.raises(
        DataError, match=r"rows.csv row (1|2): column 'completion' holds int (1|2); expected text"
    ):
        build(tok, f)


def test_empty_and_malformed_files(tok, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,output\n")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        build(tok, empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: could not read as .jsonl \(line 3: not valid JSON"):
        build(tok, bad)
    with pytest.raises(DataError, match=r"no such file: .*missing\.parquet"):
        build(tok, tmp_path / "missing.parquet")
    # a raw tab in a string: json's message is "Invalid control character at"; the column is added once
    tab = tmp_path / "tab.jsonl"
    tab.write_text('{"text": "a"}\n{"text": "a\tb"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON \(Invalid control character at column 12\)"):
        build(tok, tab)
    folder = tmp_path / "x.jsonl"  # a directory with a file's name
    folder.mkdir()
    with pytest.raises(DataError, match=r"x.jsonl is a directory, not a .jsonl file: give the file itself"):
        build(tok, folder)


def test_a_storage_fault_is_not_an_error_in_the_file(tok, tmp_path):
    """A read that fails in the storage (EIO: a disk or NFS fault) is DataUnavailable, which a restart retries,
    not DataError, which says the file is bad. The kernel's own EIO: reading /proc/self/mem at offset 0."""
    rows = tmp_path / "rows.jsonl"
    rows.symlink_to("/proc/self/mem")
    with pytest.raises(DataUnavailable) as e:
        build(tok, rows)
    assert not isinstance(e.value, DataError)
    assert f"{rows}: could not read it (EIO: Input/output error), a fault of the storage" in str(e.value)


def test_keep_if_empty_and_sources(tok, tmp_path):
    rows = [
        {"instruction": f"Sort the letters: {c} a", "input": "" if i % 2 else "x", "output": f"a {c}"}
        for i, c in enumerate("bcdefgh")
    ]
    f = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(f)
    data = build(tok, f, keep_if_empty=["input"])
    assert len(data.train) + len(data.eval) == 3
    with pytest.raises(
        DataError, match=r"keep_if_empty names column 'context'.*set data\.keep_if_empty=\[\]"
    ):
        build(tok, f, keep_if_empty=["context"])
    # a local dataset folder with train/test files: splits by name, like a hub dataset
    folder = tmp_path / "chat"
    folder.mkdir()
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_jsonl(folder / "train.jsonl", [conv] * 5)
    write_jsonl(folder / "test.jsonl", [conv] * 2)
    data = build_data(DataConfig(source=str(folder), eval_split="test"), tok, seed=0)
    assert (len(data.train), len(data.eval), data.formatter.fmt) == (5, 2, "chat")


def test_eval_split_never_evaluates_on_the_training_rows(tok, tmp_path, caplog):
    """A single file (or the generated task) has no named splits: data.eval_split (as recipes/llama3_70b.py
    sets it) or data.eval_source naming the training file itself holds out data.test_size rows instead of
    evaluating on the rows the run trains on, and the log says so."""
    rows = [{"instruction": f"Sort the letters: {c} a", "output": f"a {c}"} for c in "bcdefghijk"]
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    for kw in ({"eval_split": "test"}, {"eval_source": str(tmp_path / "." / "rows.jsonl")}):
        caplog.clear()
        with caplog.at_level("INFO", logger="shardtune"):
            data = build_data(DataConfig(source=str(f), test_size=2, **kw), tok, seed=0)
        assert (len(data.train), len(data.eval)) == (8, 2)
        # 8 + 2 distinct rows out of 10: the eval rows are not trained on
        assert len({r["instruction"] for r in data.eval_rows}) == 2
        assert "would evaluate on the training rows" in caplog.text and "data.test_size=2" in caplog.text
    generated = build_data(
        DataConfig(eval_split="test", generated=GeneratedTaskConfig(rows=100)), tok, seed=0
    )
    assert (len(generated.train), len(generated.eval)) == (95, 5)


def test_a_folder_evaluates_on_its_own_validation_or_test_split(tok, tmp_path, caplog):
    """data.source=FOLDER holding train and test (or validation) files, no eval split named: the run evaluates
    on the folder's own held-out split (validation before test; jsonl, parquet or csv) and the log says so.
    data.eval_split=<the training split> holds out data.test_size of the training rows instead."""

    def rows(split, n):
        return [{"instruction": f"{split} {i}", "output": f"o{i}"} for i in range(n)]

    def splits_of(data):
        return {r["instruction"].split()[0] for r in data.eval_rows}

    jsonl, pq, csv = (tmp_path / name for name in ("jsonl", "parquet", "csv"))
    for folder in (jsonl, pq, csv):
        folder.mkdir()
    write_jsonl(jsonl / "train.jsonl", rows("train", 10))
    write_jsonl(jsonl / "test.jsonl", rows("test", 3))
    for split, n in (("train", 10), ("validation", 2), ("test", 3)):
        pd.DataFrame(rows(split, n)).to_parquet(pq / f"{split}.parquet")
    for split, n in (("train", 10), ("test", 4)):
        pd.DataFrame(rows(split, n)).to_csv(csv / f"{split}.csv", index=False)
    with caplog.at_level("INFO", logger="shardtune"):
        data = build_data(DataConfig(source=str(jsonl)), tok, seed=0)
    assert (len(data.train), len(data.eval), splits_of(data)) == (10, 3, {"test"})
    assert f"evaluating on the 'test' split of {jsonl}, its own held-out rows" in caplog.text
    data = build_data(DataConfig(source=str(pq)), tok, seed=0)
    assert (len(data.train), len(data.eval), splits_of(data)) == (10, 2, {"validation"})
    data = build_data(DataConfig(source=str(csv)), tok, seed=0)
    assert (len(data.train), len(data.eval), splits_of(data)) == (10, 4, {"test"})
    caplog.clear()
    with caplog.at_level("INFO", logger="shardtune"):
        data = build_data(DataConfig(source=str(jsonl), eval_split="train", test_size=2), tok, seed=0)
    assert (len(data.train), len(data.eval), splits_of(data)) == (8, 2, {"train"})
    assert "would evaluate on the training rows" in caplog.text and "evaluating on the" not in caplog.text
    (jsonl / "test.jsonl").unlink()  # a folder of one split: data.test_size held out, as for a file
    data = build_data(DataConfig(source=str(jsonl), test_size=2), tok, seed=0)
    assert (len(data.train), len(data.eval), splits_of(data)) == (8, 2, {"train"})


def test_null_column_read_by_a_field_template(tok, tmp_path):
    """A null column a data.fields template reads is refused (it would train on the text 'None'), naming the
    row, the column, the field and the fix; in the optional input it is left out, as a null input column is."""
    f = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"product": "Lamp", "description": "Bright."}] * 2 + [{"product": "Desk", "description": None}],
    )
    with pytest.raises(DataError) as e:
        build(
            tok, f, format="alpaca", fields={"instruction": "Describe {product}", "output": "{description}"}
        )
    msg = str(e.value)
    assert "rows.jsonl row 3: column 'description' is empty (null)" in msg
    assert "data.fields.output='{description}'" in msg and "remove the row" in msg
    f = write_jsonl(tmp_path / "ctx.jsonl", [{"instruction": "Sort", "ctx": None, "output": "a b"}] * 2)
    formatter = RowFormatter("alpaca", tok, "ctx.jsonl", fields={"input": "Context: {ctx}"})
    assert formatter.prompt({"instruction": "Sort", "ctx": None}, 0) == ALPACA_PROMPT_NO_INPUT.format(
        instruction="Sort"
    )


def test_rows_with_an_empty_response_are_left_out_and_counted(tok, tmp_path):
    """An empty or whitespace-only response would train EOS alone: the row is left out and counted, the first
    named (hub datasets carry a few such rows and cannot be edited in place), in every format; a conversation
    keeps an empty assistant turn beside a filled one; with nothing left, the run stops and says why."""
    ok = {"instruction": "Sort c a", "output": "a c"}
    user = {"role": "user", "content": "hi"}
    cases = [
        (
            "alpaca.jsonl",
            [ok, {"instruction": "Sort b a", "output": ""}, ok, ok],
            {},
            "row 2: column 'output' is empty",
        ),
        (
            "pc.jsonl",
            [{"prompt": "Q", "completion": "  \n"}] + [{"prompt": "Q", "completion": "A"}] * 3,
            {},
            "row 1: column 'completion' is empty (whitespace only)",
        ),
        (
            "fields.jsonl",
            [
                {"q": "Sort", "a": "a b"},
                {"q": "Sort", "a": " "},
                {"q": "Sort", "a": "a b"},
                {"q": "S", "a": "c"},
            ],
            {"format": "alpaca", "fields": {"instruction": "{q}", "output": "{a}"}},
            "row 2: data.fields.output='{a}' renders empty (whitespace only)",
        ),
        (
            "chat.jsonl",
            [{"messages": [user, {"role": "assistant", "content": ""}]}]
            + [
                {
                    "messages": [
                        user,
                        {"role": "assistant", "content": ""},
                        user,
                        {"role": "assistant", "content": "ok"},
                    ]
                }
            ]
            * 3,
            {},
            "row 1: column 'messages': every assistant message is empty",
        ),
    ]
    for name, rows, kw, example in cases:
        data = build(tok, write_jsonl(tmp_path / name, rows), **kw)
        assert len(data.train.empty) + len(data.eval.empty) == 1, name
        assert (
            len(data.train) + len(data.eval) == 3 and name in example_of(data) and example in example_of(data)
        )
    with pytest.raises(
        DataError, match=r"no training row has a response token left .*have an empty response"
    ):
        build(tok, write_jsonl(tmp_path / "all.jsonl", [{"instruction": "a", "output": " "}] * 3))


def example_of(data) -> str:
    return data.train.empty_example or data.eval.empty_example


def test_csv_parse_error_names_the_line(tok, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\na,b\nc,d,e,f\n")
    with pytest.raises(
        DataError, match=r"bad\.csv: could not read as \.csv \(.*Expected 2 fields in line 3, saw 4"
    ):
        build(tok, bad)


def test_bad_field_templates_and_keys_are_refused_before_reading(tok, tmp_path):
    """data.fields: a malformed template, an empty {}, a misspelled field or one the format does not read is
    refused with the field named (the first three before the data is read: the file here does not exist)."""
    missing = tmp_path / "never_read.jsonl"
    for fields, match in [
        (
            {"output": "{description"},
            r"data\.fields\.output='\{description' is not a valid template \(expected '\}'",
        ),
        ({"output": "{}"}, r"data\.fields\.output='\{\}' has an empty \{\}; write a column as \{column\}"),
        (
            {"outptu": "{x}"},
            r"data\.fields\.outptu: .*did you mean data\.fields\.output\? the fields are instruction",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            build(tok, missing, fields=fields)
    f = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}] * 2)
    with pytest.raises(
        DataError, match=r"data\.fields\.completion is not read by format 'alpaca' \(it reads"
    ):
        build(tok, f, fields={"completion": "{output}"})


def test_test_size_above_one_must_be_a_whole_count(tok, tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    with pytest.raises(ConfigError, match=r"data\.test_size=1\.5: .* must be whole; use a fraction below 1"):
        build_data(DataConfig(source=str(f), test_size=1.5), tok, seed=0)
    data = build_data(DataConfig(source=str(f), test_size=2.0), tok, seed=0)
    assert (len(data.train), len(data.eval)) == (2, 2)


# ------------------------------------------------------------------------------------ batches
def test_sampler_is_deterministic_and_independent_of_process_count():
    def step_rows(world, micro, step):
        rows = []
        for rank in range(world):
            s = GlobalBatchSampler(100, 8, micro, world, rank, seed=3)
            rows += [i for mb in s.micro_batches(step) for i in mb]
        return sorted(rows)

    for step in (0, 5, 12, 13, 30):  # 12 steps per epoch: 12 and 13 are in the second epoch
        assert step_rows(1, 8, step) == step_rows(2, 4, step) == step_rows(4, 1, step)
    s = GlobalBatchSampler(100, 8, 2, 2, 0, seed=3)
    assert s.grad_accum == 2 and s.steps_per_epoch == 12 and s.position(13) == (1, 8)
    epoch0 = [
        i for st in range(12) for mb in GlobalBatchSampler(100, 8, 8, 1, 0, 3).micro_batches(st) for i in mb
    ]
    assert len(set(epoch0)) == 96  # no row twice within an epoch
    with pytest.raises(ConfigError, match="not a multiple"):
        GlobalBatchSampler(100, 8, 3, 2, 0, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("budget", [512, 1024, 4096])
def test_token_micro_batches_fit_the_budget_and_balance_the_processes(world, budget):
    """Micro-batches sized in tokens (train.micro_batch_tokens): every row of the step once, none over the
    budget, as many micro-batches on every process, about as many tokens, and the fewest micro-batches the
    tokens allow where the rows are many."""
    rng = np.random.default_rng(world * budget)
    lengths = np.minimum(rng.lognormal(5, 1, 500).astype(int) + 5, 512)  # data.max_len 512
    rows = [int(i) for i in rng.permutation(500)[: 48 * world]]
    dealt = token_micro_batches(rows, lengths, budget, world)
    assert len(dealt) == world and len({len(mine) for mine in dealt}) == 1
    assert sorted(i for mine in dealt for mb in mine for i in mb) == sorted(rows)
    sizes = [int(lengths[mb].sum()) for mine in dealt for mb in mine]
    assert all(0 < s <= budget for s in sizes)
    loads = [int(sum(lengths[i] for mb in mine for i in mb)) for mine in dealt]
    assert max(loads) <= 1.1 * np.mean(loads), loads
    per_process = -(-int(lengths[rows].sum()) // (budget * world))
    assert (
        len(dealt[0]) <= per_process + 1
    )  # first the fewest the tokens allow, one more where rows do not fit
    assert token_micro_batches(rows, lengths, budget, world) == dealt  # the same on every process, every time


def test_token_budget_sampler_reads_the_steps_rows_on_any_number_of_processes():
    lengths = np.random.default_rng(0).integers(5, 300, 100)

    def step_rows(world, step, **kw):
        got = [GlobalBatchSampler(100, 8, 2, world, r, 3, **kw).micro_batches(step) for r in range(world)]
        assert len({len(mine) for mine in got}) == 1  # as many micro-batches on every process
        return sorted(i for mine in got for mb in mine for i in mb)

    for step in (0, 5, 12, 13):
        expected = step_rows(1, step)  # micro-batches of 2 rows
        for world in (1, 2, 4):
            assert step_rows(world, step, lengths=lengths, micro_tokens=400) == expected
    tokens = GlobalBatchSampler(100, 8, 2, 2, 0, 3, lengths=lengths, micro_tokens=400)
    assert tokens.grad_accum is None  # it varies by step
    with pytest.raises(ConfigError, match="not a multiple of the 3 processes"):
        GlobalBatchSampler(100, 8, 2, 3, 0, 3, lengths=lengths, micro_tokens=400)


def test_padding_share_and_the_advice_to_pack():
    """The share of padded compute follows the run's own micro-batches; a run that pads a quarter or more is
    told what packing saves."""
    assert padding_share(np.array([1, 3]), 2, 2, seed=0) == pytest.approx(1 / 3)  # 2 x 3 computed, 4 real
    assert padding_share(np.full(64, 50), 8, 4, seed=0) == 0.0
    spread = np.array([10] * 7 + [1000])
    assert padding_share(spread, 8, 8, seed=0) == pytest.approx(1 - 1070 / 8000)
    # micro-batches of 1 row cannot pad; fewer rows than a global batch: nothing to say
    assert padding_share(spread, 8, 1, seed=0) == 0.0 and padding_share(spread, 16, 8, seed=0) == 0.0
    # the same share over the first epoch as the sampler's own micro-batches give
    lengths = np.random.default_rng(0).lognormal(5, 1.2, 200).astype(int) + 1
    batches = [mb for st in range(25) for mb in GlobalBatchSampler(200, 8, 4, 1, 0, 7).micro_batches(st)]
    computed = sum(len(b) * lengths[b].max() for b in batches)
    assert padding_share(lengths, 8, 4, seed=7) == pytest.approx(1 - lengths[:200].sum() / computed)

    cfg = Config()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    advice = padding_advice(lengths, cfg)
    assert (
        advice.startswith("micro-batches of 4 rows padded to their longest row: ")
        and "data.packing=true" in advice
    )
    cfg.data.packing = True
    assert padding_advice(lengths, cfg) is None
    cfg.data.packing, cfg.train.micro_batch_size = False, 1
    assert padding_advice(lengths, cfg) is None


def test_eval_batches_give_every_rank_the_same_count():
    parts = [eval_batches(21, 4, 2, r) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(i for p in parts for b in p for i in b) == list(range(21))


def test_generated_task_is_correct_and_deterministic(tok):
    cfg = GeneratedTaskConfig(rows=50, tasks=["sort", "sort_desc", "reverse"])
    rows = generate_rows(cfg, seed=1)
    assert rows == generate_rows(cfg, seed=1) and rows != generate_rows(cfg, seed=2)
    for r in rows:
        letters = r["instruction"].split(":")[1].split()
        expected = {
            "Sort the letters": sorted(letters),
            "Sort the letters from z to a": sorted(letters)[::-1],
            "Reverse the letters": letters[::-1],
        }[r["instruction"].split(":")[0]]
        assert r["output"].split() == expected and r["input"] == ""
    data = build_data(Config().data, tok, seed=0)
    assert len(data.train) == 5700 and len(data.eval) == 300
    ids, mask = data.train.row(0)
    assert tok.decode(ids[mask].tolist()).endswith("</s>")
    assert np.all(data.train.lengths() < 60)
