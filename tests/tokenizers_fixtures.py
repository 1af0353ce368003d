"""Tiny offline tokenizers with real-world chat templates, for tests of every helper."""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_python import PythonBackend

TemplateName = Literal[
    "chatml", "llama3", "mistral", "gemma", "vicuna", "zephyr", "chatml_plain", "none"
]

# Written from the public format descriptions of each model family; only string content is used.
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported after the system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
VICUNA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system = 'A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human\\'s questions.' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token + system + ' ' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)
ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class _Family:
    """How one model family's tokenizer looks: template, special tokens, pieces, BOS rule."""

    template: str | None
    specials: tuple[str, ...]  # registered as special added tokens, in this order
    bos: str | None
    eos: str
    pad: str | None
    byte_level: bool  # GPT-2/Llama-3/Qwen style bytes; False = SentencePiece-like Metaspace
    post_bos: bool  # the tokenizer itself prepends BOS when add_special_tokens=True


FAMILIES: dict[str, _Family] = {
    "chatml": _Family(
        CHATML,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        True,
        False,
    ),
    "llama3": _Family(
        LLAMA3,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        True,
        True,
    ),
    "mistral": _Family(MISTRAL, ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, False, True),
    "gemma": _Family(
        GEMMA,
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        False,
        True,
    ),
    "vicuna": _Family(VICUNA, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>", False, True),
    "zephyr": _Family(ZEPHYR, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>", False, False),
    # ChatML markers as plain text (a base vocabulary fine-tuned with a ChatML template)
    "chatml_plain": _Family(CHATML, ("<|endoftext|>",), None, "<|endoftext|>", None, True, False),
    # a base model without any chat template: the built-in template is used
    "none": _Family(None, ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None, True, False),
}

CORPUS = [
    "How many circles are in the image? There are three circles.",
    "What colour is the square? The square is red, the circle is blue.",
    "Describe the picture in one sentence: a small green triangle on a white background.",
    "You are a helpful assistant. Answer the question with a single word or phrase.",
    "Is there a dog in the image? Yes. No. Maybe; the answer is unclear!",
    "Question: where is the cat? Answer: the cat is under the table, next to 2 chairs.",
    "ASSISTANT: USER: system user assistant model [INST] [/INST] ### Human: ### Assistant:",
    "the quick brown fox jumps over the lazy dog 0123456789 (a) [b] {c} 'd' \"e\" - _ / ? \n\t",
]
# every character the property tests may draw; SentencePiece-like vocabularies need them all
ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n\t"))


@functools.cache
def _backend_json(name: str) -> str:
    """Train the tiny BPE once per family; callers get a fresh copy (tokenizers get mutated)."""
    fam = FAMILIES[name]
    specials = list(fam.specials)
    if fam.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = ALPHABET + ["\u2581"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if fam.post_bos and fam.bos is not None:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A",
            pair=f"{fam.bos} $A {fam.bos} $B",
            special_tokens=[(fam.bos, bos_id)],
        )
    elif fam.byte_level:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def make_tokenizer(template: TemplateName = "chatml") -> PreTrainedTokenizerFast:
    """A fresh tiny fast tokenizer of the given family (vocab ~320, no `<image>` token yet)."""
    if template not in FAMILIES:
        raise ValueError(f"unknown template family {template!r}; valid: {sorted(FAMILIES)}")
    fam = FAMILIES[template]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json(template)),
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad,
        unk_token="<unk>" if "<unk>" in fam.specials else None,
    )
    # register the family's control tokens as special so they are never split or skipped silently
    extra = [t for t in fam.specials if t not in {fam.bos, fam.eos, fam.pad, "<unk>"}]
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra})
    if fam.template is not None:
        tokenizer.chat_template = fam.template
    return tokenizer


_PIECE = re.compile(r" ?[^\s]+|\s")


class SlowWordTokenizer(PythonBackend):
    """A pure-Python ("slow") tokenizer without offsets: whole words with their leading space
    when known (so " three" is one token, as in SentencePiece), single characters otherwise."""

    def __init__(self, **kwargs: Any) -> None:
        words = {p for line in CORPUS for p in _PIECE.findall(line)}
        pieces = sorted(set(ALPHABET) | words)
        self._vocab = {tok: i for i, tok in enumerate(pieces)}
        self._inverse = dict(enumerate(pieces))
        super().__init__(**kwargs)

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self.added_tokens_encoder}

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        out: list[str] = []
        for piece in _PIECE.findall(text):
            out.extend([piece] if piece in self._vocab else list(piece))
        return out

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._inverse[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def make_slow_tokenizer(template: TemplateName = "chatml") -> SlowWordTokenizer:
    """A fresh slow tokenizer with the given family's special tokens and chat template."""
    fam = FAMILIES[template]
    tokenizer = SlowWordTokenizer(bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad)
    extra = [t for t in fam.specials if t not in {fam.bos, fam.eos, fam.pad}]
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra})
    if fam.template is not None:
        tokenizer.chat_template = fam.template
    return tokenizer
