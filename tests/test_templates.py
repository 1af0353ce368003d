"""Tests for chat rendering: validation, the built-in template and answer location."""

from __future__ import annotations

import pytest

from tokenizers_fixtures import CHATML, LLAMA3, make_tokenizer
from vlm_lit.data.templates import (
    DEFAULT_CHAT_TEMPLATE,
    ChatMessage,
    content_to_text,
    locate_responses,
    normalize_messages,
    render_chat,
    resolve_chat_template,
)

IMG = "<image>"


def _chat(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c, num_images=c.count(IMG)) for r, c in pairs]  # type: ignore[arg-type]


def test_content_parts_join_with_newline_and_count_images() -> None:
    parts = [{"type": "image"}, {"type": "text", "text": "How many?"}, {"type": "image"}]
    assert content_to_text(parts, IMG, "m") == ("<image>\nHow many?\n<image>", 2)
    assert content_to_text("plain text", IMG, "m") == ("plain text", 0)
    assert content_to_text([], IMG, "m") == ("", 0)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([{"type": "text", "text": 3}], r"part 0: 'text' must be a string, got int"),
        ([{"type": "text"}], r"'text' must be a string, got NoneType"),
        ([{"type": "video"}], r"'type' in \['image', 'text'\]"),
        (["just a string in a list"], r"part 0"),
        (None, r"content must be a string or a list of parts, got NoneType"),
        (42, r"got int"),
    ],
)
def test_bad_content_is_rejected_with_location(content: object, match: str) -> None:
    # ValueError even for wrong types: loaders count ValueErrors per sample instead of crashing
    with pytest.raises(ValueError, match=match):
        normalize_messages([{"role": "user", "content": content}], IMG)


def test_normalize_messages_rejects_bad_conversations() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        normalize_messages([], IMG)
    with pytest.raises(ValueError, match="non-empty list"):
        normalize_messages("hello", IMG)
    with pytest.raises(
        ValueError, match=r"message 1: unknown role 'tool'.*\['assistant', 'system', 'user'\]"
    ):
        normalize_messages(
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], IMG
        )
    with pytest.raises(ValueError, match="message 0: expected a dict with 'role' and 'content'"):
        normalize_messages([{"role": "user"}], IMG)
    with pytest.raises(ValueError, match="assistant turn"):
        normalize_messages([{"role": "assistant", "content": [{"type": "image"}]}], IMG)


def test_normalize_messages_keeps_order_and_counts_images() -> None:
    chat = normalize_messages(
        [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ],
        IMG,
    )
    assert [(m.role, m.content, m.num_images) for m in chat] == [
        ("system", "sys", 0),
        ("user", "<image>\n<image>\nq", 2),
        ("assistant", "a", 0),
    ]


def test_resolve_chat_template_prefers_the_tokenizers_own() -> None:
    assert resolve_chat_template(make_tokenizer("chatml")) == CHATML
    assert resolve_chat_template(make_tokenizer("none")) == DEFAULT_CHAT_TEMPLATE


def test_no_template_and_no_eos_is_an_error() -> None:
    tok = make_tokenizer("none")
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a chat_template nor an eos_token"):
        resolve_chat_template(tok)


def test_default_template_format() -> None:
    tok = make_tokenizer("none")
    chat = _chat(("system", "S"), ("user", "<image>\nQ"), ("assistant", "A"), ("user", "Q2"))
    text = render_chat(chat, tok, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert text == (
        "<|endoftext|>### System:\nS\n\n### User:\n<image>\nQ\n\n"
        "### Assistant:\nA<|endoftext|>\n\n### User:\nQ2\n\n### Assistant:\n"
    )


def test_template_errors_name_the_roles() -> None:
    tok = make_tokenizer("gemma")
    with pytest.raises(
        ValueError, match=r"rejected a conversation with roles \['user', 'user'\].*alternate"
    ):
        render_chat(_chat(("user", "a"), ("user", "b")), tok, tok.chat_template)


def test_locate_responses_finds_exact_spans_and_block_ends() -> None:
    tok = make_tokenizer("chatml")
    chat = _chat(("user", "Yes"), ("assistant", "Yes"), ("user", "No"), ("assistant", "No"))
    text, spans = locate_responses(chat, tok, CHATML)
    # the same words also occur in user turns: spans must point at the assistant copies
    assert [text[s.start : s.end] for s in spans] == ["Yes", "No"]
    assert [s.message_index for s in spans] == [1, 3]
    for s in spans:
        assert text[s.start - len("assistant\n") : s.start] == "assistant\n"
        assert text[s.end : s.block_end] == "<|im_end|>\n"


def test_locate_responses_follows_trimming_templates() -> None:
    tok = make_tokenizer("llama3")
    chat = _chat(("user", "q"), ("assistant", "  padded answer \n"))
    text, (span,) = locate_responses(chat, tok, LLAMA3)
    assert text[span.start : span.end] == "padded answer"
    assert text[span.end : span.block_end] == "<|eot_id|>"


def test_locate_responses_skips_empty_answers() -> None:
    tok = make_tokenizer("chatml")
    chat = _chat(("user", "q"), ("assistant", "  "), ("user", "q2"), ("assistant", "fine"))
    text, spans = locate_responses(chat, tok, CHATML)
    assert [(s.message_index, text[s.start : s.end]) for s in spans] == [(3, "fine")]


def test_locate_responses_refuses_rewritten_answers() -> None:
    tok = make_tokenizer("chatml")
    shouting = CHATML.replace("message['content']", "message['content'] | upper")
    assert locate_responses(_chat(("user", "q"), ("assistant", "quiet")), tok, shouting) is None
    # an answer rendered twice cannot be located uniquely either
    twice = CHATML.replace("+ '<|im_end|>\\n'", "+ message['content'] + '<|im_end|>\\n'")
    assert locate_responses(_chat(("user", "q"), ("assistant", "echo")), tok, twice) is None


def test_block_end_is_unknown_when_prefixes_render_differently() -> None:
    tok = make_tokenizer("chatml")
    last_eos = CHATML.replace(
        "{%- endfor %}", "{%- if loop.last %}{{- '<|endoftext|>' }}{%- endif %}{%- endfor %}"
    )
    chat = _chat(("user", "q"), ("assistant", "first"), ("user", "q2"), ("assistant", "second"))
    text, spans = locate_responses(chat, tok, last_eos)
    assert (
        spans[0].block_end is None
    )  # rendering chat[:2] ends with <|endoftext|>, the full one not
    assert text[spans[1].end : spans[1].block_end] == "<|im_end|>\n<|endoftext|>"
