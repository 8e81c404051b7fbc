"""The tokenizer built in code: deterministic, one token per task letter, any text round-trips."""

from shardtune.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer, prepare_tokenizer


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
    try:
        prepare_tokenizer(build_tiny_tokenizer(), "<|reserved_special_token_0|>", None)
    except ValueError as e:
        assert "data.pad_token" in str(e) and "not in the tokenizer's vocabulary" in str(e)
    else:
        raise AssertionError("an unknown pad token must be refused")
