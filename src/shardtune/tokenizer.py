"""Tokenizers: the one built in code for the built-in shapes, and loading a model's own.

The built-in tokenizer is a byte-level BPE trained in a few milliseconds on a fixed in-code corpus (the
prompt templates, the generated task's alphabet, some English), so it encodes any text without a hub
download. It is saved into the run directory with the base model, so a run is reloaded with exactly
the tokenizer it was trained with.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def prepare_tokenizer(
    tok: PreTrainedTokenizerBase, pad_token: str | None, chat_template: str | None
) -> PreTrainedTokenizerBase:
    """Set the pad token and chat template the run asks for (see DataConfig)."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; shardtune appends EOS to every response")
    if pad_token is not None:
        if pad_token not in tok.get_vocab():
            raise ValueError(f"data.pad_token={pad_token!r} is not in the tokenizer's vocabulary")
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        vocab = tok.get_vocab()
        tok.pad_token = next((t for t in _RESERVED_PADS if t in vocab), tok.eos_token)
    if chat_template is not None:
        tok.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
    return tok
