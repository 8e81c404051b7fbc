"""Preference rows (data.format=preference): a prompt and two responses, `chosen` and `rejected`, as TRL and the
hub's preference sets lay them out:

    plain               prompt: text, chosen: text, rejected: text
    conversational      prompt: [messages], chosen: [assistant message(s)], rejected: [...]
    whole conversations chosen: [user, assistant, ...], rejected: [...] (the prompt is the turns they share);
                        a `prompt` column beside them (HuggingFaceH4/ultrafeedback_binarized's, text) is not read,
                        nor are `messages` or score columns

Each row is encoded as two sequences, prompt + chosen and prompt + rejected, with labels on the response tokens
only (the prompt never trains, whatever data.completion_only says). Plain responses get EOS (data.append_eos)
as SFT rows do; conversations end as the chat template ends them. A row whose response is empty, or whose
chosen and rejected responses are the same, is left out and counted (as SFT leaves out an empty response);
a row that cannot be read is a DataError naming the file, the row and the column.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardtune.errors import DataError

ROLES = ("system", "user", "assistant")


class LeftOut(DataError):
    """A row with nothing to learn from: left out of training and counted (formats.encode), not an error: hub
    datasets carry a few such rows and cannot be edited in place."""


class EmptyResponse(LeftOut):
    """A row whose response is empty text (any format's): nothing to learn but EOS."""


class NoPreference(LeftOut):
    """A pair whose chosen and rejected responses are the same: it prefers nothing."""


@dataclass
class Pair:
    """A row's prompt and its two responses: text (plain rows) or message lists (conversations)."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be text or a non-empty list of {{role, content}}, got {value!r:.80}.")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}, message {i}: expected {{role: system|user|assistant, content: text}}, got {m!r:.80}."
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_pair(row: dict, values: dict, where: str) -> Pair:
    """The row's Pair. `values`: its prompt (None where the row has none), chosen and rejected, as read from
    their columns or data.fields templates; `where`: 'FILE row N' for errors."""
    chosen, rejected, prompt = values["chosen"], values["rejected"], values.get("prompt")
    for name in ("chosen", "rejected"):
        if values[name] is None:
            raise DataError(f"{where}: column {name!r} is empty (null); expected text or a list of messages.")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{where}: 'chosen' and 'rejected' must both be text or both be lists of messages; got "
            f"{type(chosen).__name__} and {type(rejected).__name__}."
        )
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            raise DataError(
                f"{where}: plain-text 'chosen' and 'rejected' need a 'prompt' column of text (got "
                f"{type(prompt).__name__}); map one with data.fields.prompt='{{column}}'."
            )
        return _checked(Pair(prompt, chosen, rejected), where)
    chosen = _messages(chosen, f"{where}: column 'chosen'")
    rejected = _messages(rejected, f"{where}: column 'rejected'")
    if chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant":
        if prompt is None:
            raise DataError(
                f"{where}: 'chosen' and 'rejected' hold only the responses, and the row has no 'prompt'."
            )
        turns = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, f"{where}: column 'prompt'")
        )
        return _checked(Pair(turns, chosen, rejected), where)
    # whole conversations: the prompt is the turns they share (a `prompt` text beside them is a copy of the
    # first user turn, as in HuggingFaceH4/ultrafeedback_binarized: not read)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":  # a response starts at an assistant turn
        shared -= 1
    if not shared:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no prompt turn (they differ from the first)."
        )
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) == shared or conv[shared]["role"] != "assistant":
            raise DataError(
                f"{where}: column {name!r} has no assistant turn after the turns it shares with the other "
                f"response (the prompt)."
            )
    return _checked(Pair(chosen[:shared], chosen[shared:], rejected[shared:]), where)


def response_text(response: str | list[dict]) -> str:
    """A response as text (a conversation's: its assistant turns, joined)."""
    if isinstance(response, str):
        return response
    return "\n".join(m["content"] for m in response if m["role"] == "assistant")


def _checked(pair: Pair, where: str) -> Pair:
    for name in ("chosen", "rejected"):
        text = response_text(getattr(pair, name))
        if not text.strip():
            raise EmptyResponse(
                f"{where}: the {name} response is empty{' (whitespace only)' if text else ''}"
            )
    if pair.chosen == pair.rejected:
        raise NoPreference(f"{where}: the chosen and rejected responses are the same")
    return pair


def pair_segments(pair: Pair, chat, suffix: str, where: str) -> list[list[tuple[str, bool]]]:
    """The pair as two sequences of (text, trained) pieces: prompt + chosen, prompt + rejected; `chat(messages,
    add_generation_prompt)` renders a conversation."""
    if not pair.conversational:
        return [
            [(pair.prompt, False), (response + suffix, True)] for response in (pair.chosen, pair.rejected)
        ]
    before = chat(pair.prompt, True)
    out = []
    for response in (pair.chosen, pair.rejected):
        full = chat(pair.prompt + response, False)
        if not full.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render the conversation as the prompt's rendering followed "
                f"by the response, so the response cannot be located; set data.chat_template."
            )
        out.append([(before, False), (full[len(before) :], True)])
    return out
