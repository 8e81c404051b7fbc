"""The tokenizer built in code: deterministic, one token per task letter, any text round-trips."""

import pytest

from shardtune.errors import ConfigError
from shardtune.model.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, prepare_tokenizer


def test_deterministic_and_sized():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == 384
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 1, 2)  # as the tiny model's config says


def test_letters_are_single_tokens_and_text_round_trips():
    tok = build_tiny_tokenizer()
    ids = tok("Sort the letters: c a h", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["Ġc", "Ġa", "Ġh"]
    for text in ("Ünïcödé, emoji 🙂 and tabs\t\n", "Human: hi</s>", "### End"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_pad_and_chat_template_settings():
    tok = prepare_tokenizer(build_tiny_tokenizer(), "</s>", "llama3")
    assert tok.pad_token == "</s>" and tok.chat_template == CHAT_TEMPLATES["llama3"]
    custom = prepare_tokenizer(build_tiny_tokenizer(), None, "{{ messages[0]['content'] }}")
    assert custom.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


def test_a_pad_token_the_tokenizer_lacks_is_refused_with_the_fix():
    """A recipe's pad token (llama3_8b.py's reserved token) that the tokenizer lacks, as the built-in one does
    under model.init=random model.name_or_path=llama3-8b: the message names data.pad_token and what to set."""
    for pad in ("<|reserved_special_token_0|>", "<bogus>"):
        with pytest.raises(ConfigError) as e:
            prepare_tokenizer(build_tiny_tokenizer(), pad, None)
        msg = str(e.value)
        assert f"data.pad_token={pad!r} is not in the tokenizer's vocabulary" in msg
        assert "set data.pad_token=null" in msg and "<pad>" in msg
    assert prepare_tokenizer(build_tiny_tokenizer(), None, None).pad_token == "<pad>"  # what null gives


def test_a_chat_template_that_is_neither_a_name_nor_jinja_is_refused():
    """'llama-3' would otherwise be rendered as the literal text of every conversation."""
    with pytest.raises(ConfigError) as e:
        prepare_tokenizer(build_tiny_tokenizer(), None, "llama-3")
    msg = str(e.value)
    assert "data.chat_template='llama-3' is neither a built-in template nor a Jinja template" in msg
    assert "did you mean 'llama3'?" in msg and "human_assistant, llama3" in msg
