"""Tokenizers: the one built in code for the built-in shapes, and loading a model's own.

The built-in tokenizer is a byte-level BPE trained in a few milliseconds on a fixed in-code corpus (the
prompt templates, the generated task's alphabet, some English), so it encodes any text without a hub
download. It is saved into the run directory with the base model, so a run is reloaded with exactly
the tokenizer it was trained with.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shardtune.config.checks import BUILTIN_SHAPE_NAMES
from shardtune.errors import ConfigError
from shardtune.model import hub

if TYPE_CHECKING:
    from shardtune.config import DataConfig, ModelConfig

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Named chat templates for format=chat (data.chat_template). Both end every turn with the EOS token so
# that the model learns to stop.
CHAT_TEMPLATES = {
    # Plain-text roles: works with base models whose special tokens were never trained (Llama-3 base).
    "human_assistant": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n\nAssistant: ' }}{% endif %}"
    ),
    # The Llama 3 instruct format (needs a tokenizer with Llama 3's header tokens).
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

# Pad-token candidates, most specific first: a reserved token is never produced by the model, so padding
# with it cannot collide with a real EOS.
_RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<unk>")

_CORPUS_ENGLISH = (
    "the of and to in is that for it as with was on be by this are or from at an which have not but they "
    "you all can one has more their will were been there other when what who would about into time only "
    "some could these two may first then any like over such make than also new after most used use work "
    "product design category description detailed following belonging create answer question explain "
    "write list give short long good best help human assistant system user message please thank reverse "
    "sort letters add numbers response instruction input output end"
)


def _corpus() -> list[str]:
    from shardtune.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
    from shardtune.data.tasks import INSTRUCTIONS

    lines = [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT] * 20 + [_CORPUS_ENGLISH] * 10
    lines += [instruction for instruction, _ in INSTRUCTIONS.values()] * 20
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    # Every letter alone and with a leading space, so the letter tasks tokenize one letter per token.
    lines += [" ".join(alphabet)] * 50 + [
        alphabet.upper(),
        "0 1 2 3 4 5 6 7 8 9",
        "### End",
        "\n\nHuman: \n\nAssistant: ",
    ]
    return lines


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer built in code (deterministic: fixed corpus, fixed vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATES["human_assistant"]
    return hf


def load_tokenizer(
    name_or_path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    field: str = "model.tokenizer",
):
    """`field`: the setting that named it, for the error when the hub has no such tokenizer for this user."""
    with hub.refusal_is_input_error(field, name_or_path):
        return AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )


def prepare_tokenizer(
    tok: PreTrainedTokenizerBase, pad_token: str | None, chat_template: str | None
) -> PreTrainedTokenizerBase:
    """Set the pad token and chat template the run asks for (see DataConfig)."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; shardtune appends EOS to every response")
    if pad_token is not None:
        check_pad_token(tok, pad_token)
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        vocab = tok.get_vocab()
        tok.pad_token = next((t for t in _RESERVED_PADS if t in vocab), tok.eos_token)
    if chat_template is not None:
        tok.chat_template = resolve_chat_template(chat_template)
    return tok


def check_pad_token(tok: PreTrainedTokenizerBase, pad_token: str) -> None:
    """data.pad_token must be one token of this tokenizer (a recipe's choice may not exist in another one,
    e.g. the built-in tokenizer that a random-init run of a recipe's shape uses)."""
    if pad_token in tok.get_vocab():
        return
    name = getattr(tok, "name_or_path", "") or "the built-in tokenizer"
    raise ConfigError(
        f"data.pad_token={pad_token!r} is not in the tokenizer's vocabulary ({name}); set data.pad_token=null "
        f"to use the tokenizer's own pad token (else a reserved token, else EOS), or one of its special tokens: "
        f"{', '.join(tok.all_special_tokens)}."
    )


def resolve_chat_template(chat_template: str) -> str:
    """data.chat_template: a built-in name, or a Jinja template. A string that is neither (a misspelled name)
    would render every conversation as itself, with nothing left to train on."""
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    close = difflib.get_close_matches(chat_template, CHAT_TEMPLATES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"data.chat_template={chat_template!r} is neither a built-in template nor a Jinja template (no '{{{{' or "
        f"'{{%'); {hint}the built-in ones are {', '.join(CHAT_TEMPLATES)}; data.chat_template=null uses the "
        f"tokenizer's own."
    )


def tokenizer_for(mcfg: ModelConfig, dcfg: DataConfig, run_dir: Path):
    """The tokenizer the run trains with: the run directory's own when resuming, else the model's (or the
    built-in one for the built-in shapes), with the configured pad token and chat template."""
    saved = run_dir / "tokenizer"
    if saved.is_dir():  # a resumed run uses exactly the tokenizer it started with
        tok = load_tokenizer(str(saved))
    elif mcfg.tokenizer:
        tok = load_tokenizer(mcfg.tokenizer, trust_remote_code=mcfg.trust_remote_code)
    elif mcfg.name_or_path in BUILTIN_SHAPE_NAMES:
        tok = build_tiny_tokenizer()
    else:
        tok = load_tokenizer(mcfg.name_or_path, mcfg.revision, mcfg.trust_remote_code, "model.name_or_path")
    return prepare_tokenizer(tok, dcfg.pad_token, dcfg.chat_template)
