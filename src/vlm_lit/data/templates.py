"""Chat rendering: message validation, the built-in fallback template and response location."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("assistant", "system", "user")

# Content parts are joined with a newline: `[image, text]` renders as "<image>\nHow many?",
# the LLaVA convention, and consecutive text parts stay visibly separate.
PART_SEPARATOR = "\n"

# Used only when the tokenizer has no `chat_template` (a base model). Each assistant answer is
# closed by the tokenizer's EOS, a special token the LM already knows, so generation stops on it.
# The role line ends with a newline so the answer never shares a token with its header.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)

# Stand-ins for assistant contents while locating them in the rendering: private-use code points
# survive `trim`/`strip` filters and never occur in real text (checked anyway).
_SENTINEL = "\ue000{}\ue001"


@dataclass(frozen=True)
class ChatMessage:
    """One validated message as the template sees it: string content, images as placeholders."""

    role: Role
    content: str
    num_images: int


@dataclass(frozen=True)
class ResponseSpan:
    """Where one non-empty assistant content sits in the rendered conversation (char offsets)."""

    message_index: int
    start: int
    end: int
    # end of this assistant message's block when the template renders prefixes stably
    # (`render(messages[:i+1])` is a prefix of the full rendering), else None
    block_end: int | None


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own `chat_template`, or `DEFAULT_CHAT_TEMPLATE` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "default" is what apply_chat_template uses
        template = template.get("default")
    if isinstance(template, str) and template:
        return template
    if tokenizer.eos_token is None:
        raise ValueError(
            "tokenizer has neither a chat_template nor an eos_token, so nothing can mark the end of "
            "an answer; set tokenizer.chat_template or tokenizer.eos_token"
        )
    return DEFAULT_CHAT_TEMPLATE


def content_to_text(content: Any, image_token: str, where: str) -> tuple[str, int]:
    """Join a message's content (string or parts) into template text; return (text, images).

    Malformed content raises ValueError (also for wrong types): it is bad data, and data
    loaders count ValueErrors per sample instead of crashing.
    """
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise ValueError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    pieces: list[str] = []
    num_images = 0
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(image_token)
            num_images += 1
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}, part {j}: 'text' must be a string, got {type(text).__name__}"
                )
            pieces.append(text)
        else:
            raise ValueError(
                f"{where}, part {j}: expected a dict with 'type' in ['image', 'text'], got {part!r}"
            )
    return PART_SEPARATOR.join(pieces), num_images


def normalize_messages(messages: Any, image_token: str) -> list[ChatMessage]:
    """Validate roles and contents; image parts become `image_token` (one per image)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    chat: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"message {i}: expected a dict with 'role' and 'content', got {message!r}"
            )
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; valid roles: {list(ROLES)}")
        text, num_images = content_to_text(message["content"], image_token, f"message {i} ({role})")
        if role == "assistant" and num_images:
            raise ValueError(
                f"message {i}: image parts in an assistant turn are not supported (the answer "
                "would have to generate an image); move the image to a user turn"
            )
        chat.append(ChatMessage(role=role, content=text, num_images=num_images))
    return chat


def render_chat(
    chat: Sequence[ChatMessage],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    add_generation_prompt: bool = False,
    contents: Sequence[str] | None = None,
) -> str:
    """Render through the tokenizer's own `apply_chat_template` (optionally with other contents)."""
    texts = contents if contents is not None else [m.content for m in chat]
    conversation = [{"role": m.role, "content": t} for m, t in zip(chat, texts, strict=True)]
    try:
        return tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as err:  # jinja raise_exception() and template bugs surface here
        roles = [m.role for m in chat]
        raise ValueError(
            f"the chat template rejected a conversation with roles {roles}: {err}"
        ) from err


def _trim_variants(content: str) -> list[str]:
    """Forms a template may render `content` as (`| trim`, `.strip('\\n')`...), most faithful first."""
    variants = [content, content.strip(), content.lstrip(), content.rstrip()]
    variants += [content.strip("\n"), content.lstrip("\n"), content.rstrip("\n")]
    return list(dict.fromkeys(variants))


def locate_responses(
    chat: Sequence[ChatMessage],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    add_generation_prompt: bool = False,
) -> tuple[str, list[ResponseSpan]] | None:
    """Render once and find each non-empty assistant content's exact character span.

    Every non-empty assistant content is replaced by a unique sentinel and rendered again; the
    text between sentinels must match the real rendering piece by piece, each content appearing
    verbatim or whitespace-trimmed. Returns None when the template transforms contents in any
    other way (the caller drops the sample as a tokenization mismatch, never guesses).
    """
    text = render_chat(chat, tokenizer, template, add_generation_prompt)
    targets = [i for i, m in enumerate(chat) if m.role == "assistant" and m.content.strip()]
    if not targets:
        return text, []
    sentinels = {i: _SENTINEL.format(k) for k, i in enumerate(targets)}
    if any(s in m.content for s in sentinels.values() for m in chat):
        return None
    masked = [sentinels.get(i, m.content) for i, m in enumerate(chat)]
    stencil = render_chat(chat, tokenizer, template, add_generation_prompt, contents=masked)
    # split the stencil into the template's own text around each sentinel, in order
    segments: list[str] = []
    rest = stencil
    for i in targets:
        head, found, rest = rest.partition(sentinels[i])
        if not found or stencil.count(sentinels[i]) != 1:  # reordered or repeated contents
            return None
        segments.append(head)
    if not text.startswith(segments[0]):
        return None
    pos = len(segments[0])
    spans: list[ResponseSpan] = []
    for k, i in enumerate(targets):
        following = segments[k + 1] if k + 1 < len(targets) else rest
        for variant in _trim_variants(chat[i].content):
            if (
                variant
                and text.startswith(variant, pos)
                and text.startswith(following, pos + len(variant))
            ):
                break
        else:
            return None
        spans.append(
            ResponseSpan(
                i,
                pos,
                pos + len(variant),
                _block_end(chat, i, text, pos + len(variant), tokenizer, template),
            )
        )
        pos += len(variant) + len(following)
    return (text, spans) if pos == len(text) else None


def _block_end(
    chat: Sequence[ChatMessage],
    index: int,
    text: str,
    content_end: int,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
) -> int | None:
    """End of message `index`'s block, from rendering the prefix `chat[: index + 1]`."""
    try:
        prefix = render_chat(chat[: index + 1], tokenizer, template)
    except ValueError:  # some templates only accept complete conversations
        return None
    if text.startswith(prefix) and len(prefix) >= content_end:
        return len(prefix)
    return None
