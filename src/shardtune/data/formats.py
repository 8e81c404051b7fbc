"""Row formats: turn a row into text whose response part is marked, then into token ids and labels.

Every format renders a row as segments `(text, trained)`. The segments are joined and tokenized once
(never piecewise, which would change how BPE merges at the boundary), and a token gets a label when its
character span overlaps a trained segment; every other token gets -100. EOS is appended as a token id.

    preference         prompt -> chosen, rejected                 (two sequences per row: preference.py)
    alpaca             instruction [+ input] -> output           (the Stanford Alpaca prompt)
    chat               messages: [{role, content}, ...]          (the tokenizer's chat template)
    prompt_completion  prompt -> completion
    text               text (every token trained)
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardtune.data.preference import (
    EmptyResponse,
    LeftOut,
    Pair,
    pair_segments,
    read_pair,
    response_text,
)
from shardtune.errors import ConfigError, DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# format -> (required fields, optional fields)
# (in the order format=auto tries them: preference sets often carry a `messages` column too)
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("chosen", "rejected"), ("prompt",)),
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
# responses: a row must give one, neither null nor empty (an empty one would train EOS alone). Not `text`:
# plain-text corpora (wikitext) are full of empty lines, and refusing them would refuse the corpus.
RESPONSE_FIELDS = ("output", "completion")
# fields data.fields can build from templates (chat rows are read from their messages column as they are)
TEMPLATE_FIELDS = tuple(
    dict.fromkeys(
        f
        for fmt, (req, opt) in sorted(FORMAT_FIELDS.items(), key=lambda item: item[0] == "preference")
        if fmt != "chat"
        for f in req + opt
    )
)
IGNORE_INDEX = -100


def detect_format(columns: list[str], fields: dict[str, str], origin: str) -> str:
    """The first format whose required fields are all columns or templates in data.fields."""
    available = set(columns) | set(fields)
    for fmt, (required, _) in FORMAT_FIELDS.items():
        if set(required) <= available:
            return fmt
    wanted = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMAT_FIELDS.items())
    raise DataError(
        f"{origin}: cannot tell the format from its columns ({', '.join(columns) or 'none'}). "
        f"Columns each format needs: {wanted}. Set data.format, or map columns with data.fields "
        f"(e.g. data.fields.output='{{response}}')."
    )


def _template_columns(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_field_templates(fields: dict[str, str]) -> None:
    """Every data.fields key is a field some format reads, and every template parses (before data is read)."""
    for name, template in fields.items():
        if name not in TEMPLATE_FIELDS:
            close = difflib.get_close_matches(name, TEMPLATE_FIELDS, n=1)
            hint = f"did you mean data.fields.{close[0]}? " if close else ""
            raise ConfigError(
                f"data.fields.{name}: {name!r} is not a field that data.fields builds; {hint}the fields are "
                f"{', '.join(TEMPLATE_FIELDS)} (chat rows are read from their messages column as they are)."
            )
        fix = "write a column as {column} and a literal brace as {{ or }}"
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
        except ValueError as e:
            raise ConfigError(
                f"data.fields.{name}={template!r} is not a valid template ({e}); {fix}."
            ) from None
        if "" in names:  # '{}' fills by position, and a row's columns have names only
            raise ConfigError(f"data.fields.{name}={template!r} has an empty {{}}; {fix}.")


@dataclass
class RowFormatter:
    """Renders rows of one source in one format (see DataConfig for the settings)."""

    fmt: str
    tokenizer: Any
    origin: str
    fields: dict[str, str] = field(default_factory=dict)
    response_suffix: str = ""
    completion_only: bool = True

    @property
    def group(self) -> int:
        """Sequences per row: 2 for a preference pair (chosen, rejected), else 1."""
        return 2 if self.fmt == "preference" else 1

    def check_fields(self) -> None:
        """Every data.fields template is one this format reads (a template for another format's field would
        be silently ignored)."""
        required, optional = FORMAT_FIELDS[self.fmt]
        for name in self.fields:
            if name not in required + optional or self.fmt == "chat":
                reads = (
                    "none: chat rows are read from their messages column as they are"
                    if self.fmt == "chat"
                    else ", ".join(required + optional)
                )
                raise DataError(
                    f"{self.origin}: data.fields.{name} is not read by format {self.fmt!r} (it reads {reads}); "
                    f"remove it, or set data.format to the format it is for."
                )

    def check_columns(self, columns: list[str]) -> None:
        """Every column the format (and its field templates) reads must exist."""
        required, optional = FORMAT_FIELDS[self.fmt]
        for name in required:
            needed = _template_columns(self.fields[name]) if name in self.fields else [name]
            for column in needed:
                if column not in columns:
                    how = (
                        f"data.fields.{name}={self.fields[name]!r} reads it"
                        if name in self.fields
                        else (
                            f"format {self.fmt!r} needs it; map another column with data.fields.{name}='{{column}}'"
                        )
                    )
                    raise DataError(
                        f"{self.origin}: missing column {column!r} ({how}). Columns: {', '.join(columns)}."
                    )
        for name in optional:
            for column in _template_columns(self.fields.get(name, "")):
                if column not in columns:
                    raise DataError(f"{self.origin}: missing column {column!r} (read by data.fields.{name}).")
        if self.fmt == "chat" and self.tokenizer.chat_template is None:
            raise DataError(
                f"{self.origin}: format 'chat' needs a chat template and the tokenizer has none; set "
                f"data.chat_template (e.g. human_assistant)."
            )

    # --------------------------------------------------------------------------------------- fields
    def _field(self, row: dict, name: str, idx: int, optional: bool = False) -> str:
        text = (
            self._template(row, name, idx, optional)
            if name in self.fields
            else self._column(row, name, idx, optional)
        )
        if name in RESPONSE_FIELDS and not text.strip():
            source = (
                f"data.fields.{name}={self.fields[name]!r} renders"
                if name in self.fields
                else f"column {name!r} is"
            )
            raise EmptyResponse(
                f"{self.origin} row {idx + 1}: {source} empty{' (whitespace only)' if text else ''}"
            )
        return text

    def _template(self, row: dict, name: str, idx: int, optional: bool) -> str:
        """data.fields.<name> filled from the row; a null column is an error (it would render as 'None'),
        except in an optional field, which is then left out, as a null optional column is."""
        template = self.fields[name]
        for column in _template_columns(template):
            if column not in row:
                raise DataError(
                    f"{self.origin} row {idx + 1}: missing column {column!r} (data.fields.{name})"
                )
            if row[column] is None:
                if optional:
                    return ""
                raise DataError(
                    f"{self.origin} row {idx + 1}: column {column!r} is empty (null), and "
                    f"data.fields.{name}={template!r} reads it; expected text. Fill it in or remove the row."
                )
        return template.format(**row)

    def _column(self, row: dict, name: str, idx: int, optional: bool) -> str:
        value = row.get(name)
        if value is None:
            if optional:
                return ""
            raise DataError(f"{self.origin} row {idx + 1}: column {name!r} is empty (null); expected text.")
        if not isinstance(value, str):
            raise DataError(
                f"{self.origin} row {idx + 1}: column {name!r} holds {type(value).__name__} {value!r}; expected text."
            )
        return value

    def _messages(self, row: dict, idx: int) -> list[dict[str, str]]:
        messages = row.get("messages")
        where = f"{self.origin} row {idx + 1}: column 'messages'"
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} must be a non-empty list of {{role, content}}, got {messages!r:.80}.")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise DataError(
                    f"{where}, message {i}: expected {{role: system|user|assistant, content: text}}, got {m!r:.80}."
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where} has no assistant message, so there is nothing to train on.")
        # (one empty assistant turn among others, e.g. a tool call's, still trains its end of turn)
        if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
            raise EmptyResponse(f"{where}: every assistant message is empty")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _pair(self, row: dict, idx: int) -> Pair:
        where = f"{self.origin} row {idx + 1}"
        values = {
            name: self._template(row, name, idx, name == "prompt") if name in self.fields else row.get(name)
            for name in ("prompt", "chosen", "rejected")
        }
        pair = read_pair(row, values, where)
        if pair.conversational and self.tokenizer.chat_template is None:
            raise DataError(
                f"{where}: conversational preference rows need a chat template and the tokenizer has none; set "
                f"data.chat_template (e.g. human_assistant)."
            )
        return pair

    # ------------------------------------------------------------------------------------ rendering
    def sequences(self, row: dict, idx: int, append_eos: bool) -> list[tuple[list[tuple[str, bool]], bool]]:
        """The row's sequences (one; two for a preference pair), each as (text, trained) pieces and whether
        EOS is appended to it as a token (data.append_eos, except where a chat template ends the text)."""
        if self.fmt != "preference":
            return [(self.segments(row, idx), append_eos and self.fmt != "chat")]
        pair = self._pair(row, idx)
        where = f"{self.origin} row {idx + 1}"
        eos = append_eos and not pair.conversational
        return [(seq, eos) for seq in pair_segments(pair, self._chat, self.response_suffix, where)]

    def segments(self, row: dict, idx: int) -> list[tuple[str, bool]]:
        """The row as (text, trained) pieces; EOS is added later, as a token."""
        prompt, response = None, None
        if self.fmt == "alpaca":
            prompt = self.prompt(row, idx)
            response = self._field(row, "output", idx) + self.response_suffix
        elif self.fmt == "prompt_completion":
            prompt = self._field(row, "prompt", idx)
            response = self._field(row, "completion", idx) + self.response_suffix
        elif self.fmt == "text":
            return [(self._field(row, "text", idx), True)]
        else:
            return self._chat_segments(self._messages(row, idx), idx)
        return [(prompt, not self.completion_only), (response, True)]

    def _chat_segments(self, messages: list[dict], idx: int) -> list[tuple[str, bool]]:
        # Render growing prefixes; each assistant turn is the text its message adds after the generation
        # prompt. A template whose renderings are not prefixes of each other cannot be masked this way.
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._chat(messages[:i], add_generation_prompt=True)
            upto = self._chat(messages[: i + 1])
            if not (before.startswith(done) and upto.startswith(before)):
                raise DataError(
                    f"{self.origin} row {idx + 1}: the chat template does not render conversations as growing "
                    f"prefixes, so assistant turns cannot be located; set data.chat_template."
                )
            out += [(before[len(done) :], not self.completion_only), (upto[len(before) :], True)]
            done = upto
        full = self._chat(messages)
        if len(full) > len(done):
            out.append((full[len(done) :], not self.completion_only))
        return [(t, trained) for t, trained in out if t]

    def prompt(self, row: dict, idx: int) -> str:
        """The text a model continues to produce this row's response (for generation)."""
        if self.fmt == "alpaca":
            instruction = self._field(row, "instruction", idx)
            extra = self._field(row, "input", idx, optional=True)
            template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
            return template.format(instruction=instruction, input=extra)
        if self.fmt == "prompt_completion":
            return self._field(row, "prompt", idx)
        if self.fmt == "chat":
            messages = self._messages(row, idx)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return self._chat(messages[:last], add_generation_prompt=True)
        if self.fmt == "preference":
            pair = self._pair(row, idx)
            return self._chat(pair.prompt, True) if pair.conversational else pair.prompt
        return ""

    def reference(self, row: dict, idx: int) -> str:
        """The response the data gives for this row (for exact-match scoring of generations)."""
        if self.fmt == "alpaca":
            return self._field(row, "output", idx) + self.response_suffix
        if self.fmt == "prompt_completion":
            return self._field(row, "completion", idx) + self.response_suffix
        if self.fmt == "chat":
            return [m for m in self._messages(row, idx) if m["role"] == "assistant"][-1]["content"]
        if self.fmt == "preference":
            return self._response(row, idx, "chosen")
        return ""

    def rejected(self, row: dict, idx: int) -> str | None:
        """The response a preference row rejects (beside the generated sample); None for other formats."""
        return self._response(row, idx, "rejected") if self.fmt == "preference" else None

    def _response(self, row: dict, idx: int, name: str) -> str:
        pair = self._pair(row, idx)
        text = response_text(getattr(pair, name))
        return text if pair.conversational else text + self.response_suffix

    def question_prompt(self, question: str) -> str:
        """A free-form question (eval.questions) in this format's prompt."""
        if self.fmt == "alpaca":
            return ALPACA_PROMPT_NO_INPUT.format(instruction=question)
        if self.fmt == "chat":
            return self._chat([{"role": "user", "content": question}], add_generation_prompt=True)
        return question


@dataclass
class Encoded:
    """Token ids of many rows, stored flat (int32) with offsets; `trained` marks tokens that get a label."""

    ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    truncated: int = 0
    dropped: int = 0
    empty: list[int] = field(default_factory=list)  # rows left out: their response is empty text
    empty_example: str = ""  # what the first of them was

    group: int = 1  # sequences per row: 1, or 2 for a preference pair (chosen, then rejected)

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.group

    def sequence(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.ids[a:b], self.trained[a:b]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i's one sequence (group 1)."""
        assert self.group == 1, "a row of pairs has two sequences: sequences()"
        return self.sequence(i)

    def sequences(self, rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The sequences of `rows` as one batch: the first sequence of every row, then the second (a batch of
        pairs: every chosen response, then every rejected one, in the same order)."""
        return [self.sequence(i * self.group + k) for k in range(self.group) for i in rows]

    def lengths(self) -> np.ndarray:
        """Tokens per row (a pair's: both sequences')."""
        return np.diff(self.offsets).reshape(-1, self.group).sum(axis=1)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text (Llama's do)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _joined(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    """The pieces joined, and the character spans of the trained ones."""
    text, pos, spans = "", 0, []
    for piece, trained in segments:
        if trained:
            spans.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, spans


def _labelled(tok, text: str, ids, offs, spans, bos: str | None, eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """A sequence's ids and trained mask: a token is trained where its characters overlap a trained span; BOS
    in front (where the tokenizer puts it and the text lacks it), EOS behind (trained) where asked."""
    mask = np.zeros(len(ids), dtype=bool)
    for k, (a, b) in enumerate(offs):
        mask[k] = b > a and any(a < hi and b > lo for lo, hi in spans)
    ids = np.asarray(ids, dtype=np.int64)
    if bos is not None and not text.startswith(bos):
        ids = np.concatenate([[tok.bos_token_id], ids])
        mask = np.concatenate([[False], mask])
    if eos:
        ids = np.concatenate([ids, [tok.eos_token_id]])
        mask = np.concatenate([mask, [True]])
    return ids, mask


def encode(
    formatter: RowFormatter,
    rows: list[dict],
    max_len: int,
    append_eos: bool,
    numbers: list[int] | None = None,
    batch: int = 1000,
) -> Encoded:
    """Tokenize rows (in batches, by the fast tokenizer) into ids and label masks; truncate to max_len.

    `numbers` are the rows' 1-based positions in their source, for error messages. Rows left without a
    single trained token after truncation are dropped (and counted), as are rows whose response is empty
    (their positions in `rows` kept in `empty`). A row of pairs is two sequences (`group`), kept or dropped
    together.
    """
    numbers = numbers or list(range(1, len(rows) + 1))
    tok = formatter.tokenizer
    bos = tok.bos_token if adds_bos(tok) else None
    ids_all: list[np.ndarray] = []
    trained_all: list[np.ndarray] = []
    truncated = dropped = 0
    empty: list[int] = []
    empty_example = ""
    for start in range(0, len(rows), batch):
        texts, spans, eos, owner = [], [], [], []
        for j, row in enumerate(rows[start : start + batch]):
            try:
                sequences = formatter.sequences(row, numbers[start + j] - 1, append_eos)
            except LeftOut as e:
                empty.append(start + j)
                empty_example = empty_example or str(e)
                continue
            for segments, with_eos in sequences:
                text, trained_spans = _joined(segments)
                texts.append(text)
                spans.append(trained_spans)
                eos.append(with_eos)
                owner.append(j)
        if not texts:  # every row of this batch left out (the tokenizer takes no empty batch)
            continue
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        row: list[tuple[np.ndarray, np.ndarray]] = []
        for k, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
            row.append(_labelled(tok, texts[k], ids, offs, spans[k], bos, eos[k]))
            if k + 1 < len(texts) and owner[k + 1] == owner[k]:
                continue  # the row's next sequence
            truncated += any(len(ids) > max_len for ids, _ in row)
            row = [(ids[:max_len], mask[:max_len]) for ids, mask in row]
            # the first token is never a target (nothing precedes it)
            if all(mask[1:].any() for _, mask in row):
                ids_all += [ids.astype(np.int32) for ids, _ in row]
                trained_all += [mask for _, mask in row]
            else:
                dropped += 1
            row = []
    lengths = np.array([len(x) for x in ids_all], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Encoded(
        ids=np.concatenate(ids_all) if ids_all else np.zeros(0, np.int32),
        trained=np.concatenate(trained_all) if trained_all else np.zeros(0, bool),
        offsets=offsets,
        truncated=truncated,
        dropped=dropped,
        empty=empty,
        empty_example=empty_example,
        group=formatter.group,
    )
