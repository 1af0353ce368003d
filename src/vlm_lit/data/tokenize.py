"""Tokenize chats and interleaved documents into ids and labels (-100 off the responses)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from vlm_lit.data.templates import (
    ChatMessage,
    ResponseSpan,
    content_to_text,
    locate_responses,
    normalize_messages,
    resolve_chat_template,
)

__all__ = [
    "DROP_REASONS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "DroppedSample",
    "ensure_image_token",
    "tokenize_conversation",
    "tokenize_document",
]

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

DropReason = Literal["empty_response", "truncated_no_response", "too_long", "tokenization_mismatch"]
# empty_response: every assistant answer (or every document text) is empty or whitespace
# truncated_no_response: the turns that fit in max_length hold no supervised token
# too_long: not even the first exchange (or a generation prompt) fits in max_length
# tokenization_mismatch: the template rewrites answers beyond whitespace trimming, or (slow
#   tokenizers) a token straddles an answer boundary so no exact mask exists
DROP_REASONS: tuple[str, ...] = (
    "empty_response",
    "too_long",
    "tokenization_mismatch",
    "truncated_no_response",
)


class DroppedSample(ValueError):
    """A valid sample that must not be trained on; `.reason` is one of `DROP_REASONS`."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"sample dropped ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Register IMAGE_TOKEN as a special token; True iff the vocabulary grew (resize the LM)."""
    added = tokenizer.added_tokens_decoder.get(tokenizer.added_tokens_encoder.get(IMAGE_TOKEN, -1))
    if added is not None and added.special:
        return False
    size = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    return len(tokenizer) > size


@dataclass(frozen=True)
class _TokenView:
    """Token ids of one rendering plus how to map character ranges onto them."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None  # None for tokenizers without offset support
    ends: list[int]  # offsets' end chars (non-decreasing), for bisection

    def tokens_between(self, a: int, b: int, tokenizer: PreTrainedTokenizerBase) -> range:
        """Indices of the tokens overlapping text[a:b] (a token straddling a or b included)."""
        if a >= b:
            return range(0)
        if self.offsets is not None:
            first = last = bisect.bisect_right(self.ends, a)
            while last < len(self.ids) and self.offsets[last][0] < b:
                last += 1
            return range(first, last)
        # slow tokenizers: a token such as SentencePiece's "▁three" may start on the
        # whitespace just before `a`; it belongs to the range, as with offsets
        back = a
        while back > 0 and self.text[back - 1].isspace():
            back -= 1
        for start in range(a, back - 1, -1):
            first = self._count_prefix(start, tokenizer)
            if first is not None:
                break
        last = self._count_prefix(b, tokenizer)
        if first is None or last is None:
            raise DroppedSample(
                "tokenization_mismatch",
                f"a token straddles chars {a}..{b} of the rendered chat and this tokenizer has "
                "no offsets (slow tokenizer): use a fast tokenizer",
            )
        return range(first, last)

    def _count_prefix(self, pos: int, tokenizer: PreTrainedTokenizerBase) -> int | None:
        """Tokens in text[:pos] if they are exactly a prefix of the full ids, else None."""
        head = tokenizer(self.text[:pos], add_special_tokens=False)["input_ids"]
        return len(head) if head == self.ids[: len(head)] else None


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> _TokenView:
    """Tokenize exactly as `apply_chat_template(tokenize=True)` does: no extra special tokens."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(x), int(y)) for x, y in enc["offset_mapping"]]
        return _TokenView(text, list(enc["input_ids"]), offsets, [y for _, y in offsets])
    return _TokenView(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]), None, [])


def _end_of_turn(
    view: _TokenView,
    span: ResponseSpan,
    first: int,
    tokenizer: PreTrainedTokenizerBase,
    banned: set[int],
    specials: set[int],
) -> int:
    """One past the last end-of-turn token after an answer whose last token is `first - 1`.

    With a known block end: the tokens up to the block's last non-space character (e.g.
    `<|im_end|>` but not the `\n` after it). Otherwise: whitespace tokens followed by the first
    special token; nothing if ordinary text comes first. Either stops before a banned id.
    """
    if span.block_end is not None:
        limit = span.end + len(view.text[span.end : span.block_end].rstrip())
        stop = max(first, view.tokens_between(span.end, limit, tokenizer).stop)
        stop = next((i for i in range(first, stop) if view.ids[i] in banned), stop)
        # cut short by a banned id: the whitespace before it is no end-of-turn marker either
        while stop > first and view.ids[stop - 1] not in specials:
            if tokenizer.decode([view.ids[stop - 1]]).strip():
                break
            stop -= 1
        return stop
    for i in range(first, len(view.ids)):
        tid = view.ids[i]
        if tid in specials:
            return first if tid in banned else i + 1
        if tokenizer.decode([tid]).strip():
            return first
    return first


def _label(
    view: _TokenView, spans: list[ResponseSpan], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Labels: ids on each answer's tokens and its end-of-turn tokens, IGNORE_INDEX elsewhere.

    A token that straddles an answer boundary (e.g. a BPE piece " Three" whose space belongs to
    the header) counts as part of the answer: the model has to produce it.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # BOS and padding are never targets unless they double as EOS (GPT-2 style vocabularies)
    banned = {image_id} | {
        t
        for t in (tokenizer.bos_token_id, tokenizer.pad_token_id)
        if t is not None and t != tokenizer.eos_token_id
    }
    specials = set(tokenizer.all_special_ids)
    specials.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    labels = [IGNORE_INDEX] * len(view.ids)
    for span in spans:
        answer = view.tokens_between(span.start, span.end, tokenizer)
        stop = _end_of_turn(view, span, answer.stop, tokenizer, banned, specials)
        for i in range(answer.start, stop):
            labels[i] = view.ids[i]
    labels = [
        IGNORE_INDEX if t == image_id else lab for t, lab in zip(view.ids, labels, strict=True)
    ]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token, so it is never a target
    return labels


def _check_images(
    ids: list[int], expected: int, tokenizer: PreTrainedTokenizerBase, where: str
) -> None:
    found = ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if found != expected:
        raise ValueError(
            f"{where}: {expected} image part(s) but {found} {IMAGE_TOKEN!r} token(s) after "
            f"tokenization; text must not contain the literal {IMAGE_TOKEN!r}: use "
            "{'type': 'image'} parts instead"
        )


def _encode_chat(
    chat: list[ChatMessage],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    add_generation_prompt: bool,
) -> tuple[list[int], list[int]]:
    located = locate_responses(chat, tokenizer, template, add_generation_prompt)
    if located is None:
        raise DroppedSample(
            "tokenization_mismatch",
            "the chat template changes assistant contents beyond trimming whitespace, so their "
            "tokens cannot be located exactly",
        )
    text, spans = located
    view = _encode(text, tokenizer)
    _check_images(view.ids, sum(m.num_images for m in chat), tokenizer, "conversation")
    return view.ids, _label(view, spans, tokenizer)


def _pack(ids: list[int], labels: list[int], num_images: int) -> dict[str, Any]:
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
        "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
        "num_images": num_images,
        "num_supervised": sum(lab != IGNORE_INDEX for lab in labels),
    }


def _prepare(tokenizer: PreTrainedTokenizerBase) -> None:
    if ensure_image_token(tokenizer):
        log.warning(
            "added %r to the tokenizer (new id %d); resize the model's embeddings to len(tokenizer)",
            IMAGE_TOKEN,
            tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        )


def tokenize_conversation(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    num_images: int | None = None,
) -> dict[str, Any]:
    """Render a chat with the tokenizer's template and label its answers.

    Returns {"input_ids" (T,), "labels" (T,), "num_images", "num_supervised"}; `input_ids`
    equal `apply_chat_template(tokenize=True)` for the conversation with each image part
    replaced by IMAGE_TOKEN (parts joined by "\\n"). Supervised: every non-empty assistant
    content plus the end-of-turn token(s) its template puts right after it. `max_length` drops
    whole trailing exchanges (each ending with an assistant turn) and never cuts a turn;
    `num_images` then counts the kept placeholders: keep the first `num_images` images.
    A conversation without assistant turns (an evaluation prompt) returns all-(-100) labels.

    Raises ValueError on malformed input (unknown role, non-string text, empty conversation,
    `num_images` differing from the image parts) and `DroppedSample` when nothing trainable is
    left of a conversation that had answers.
    """
    _prepare(tokenizer)
    chat = normalize_messages(messages, IMAGE_TOKEN)
    total_images = sum(m.num_images for m in chat)
    if num_images is not None and num_images != total_images:
        raise ValueError(
            f"conversation has {total_images} image part(s) but {num_images} image(s) were given"
        )
    answers = [m for m in chat if m.role == "assistant"]
    if answers and not any(m.content.strip() for m in answers):
        raise DroppedSample("empty_response", "every assistant turn is empty")
    template = resolve_chat_template(tokenizer)
    ids, labels = _encode_chat(chat, tokenizer, template, add_generation_prompt)
    kept = chat
    if max_length is not None and len(ids) > max_length:
        kept, ids, labels = _truncate(chat, tokenizer, template, add_generation_prompt, max_length)
    result = _pack(ids, labels, sum(m.num_images for m in kept))
    if answers and result["num_supervised"] == 0:
        raise DroppedSample("truncated_no_response", f"no answer fits in max_length={max_length}")
    return result


def _truncate(
    chat: list[ChatMessage],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    add_generation_prompt: bool,
    max_length: int,
) -> tuple[list[ChatMessage], list[int], list[int]]:
    """Longest prefix ending after an assistant turn that fits; each candidate rendered afresh."""
    # a generation prompt is useless without its final question, so it is never shortened
    cuts = (
        []
        if add_generation_prompt
        else [i + 1 for i, m in enumerate(chat[:-1]) if m.role == "assistant"]
    )
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:  # rendered length grows with the number of turns kept
        mid = (lo + hi) // 2
        ids, labels = _encode_chat(chat[: cuts[mid]], tokenizer, template, add_generation_prompt)
        if len(ids) <= max_length:
            best, lo = (chat[: cuts[mid]], ids, labels), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise DroppedSample(
            "too_long", f"not even the first exchange fits in max_length={max_length}"
        )
    return best


def tokenize_document(
    parts: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    num_images: int | None = None,
) -> dict[str, Any]:
    """Tokenize an interleaved document: every text token supervised, placeholders not.

    Parts are joined by "\\n" (like chat content). BOS is whatever the tokenizer itself adds
    (never supervised); EOS is appended (supervised) when the tokenizer has one and the document
    is complete. `max_length` cuts the token sequence (inside the last text kept, never through
    an image) and removes placeholders left at its end; `num_images` counts those kept.
    """
    _prepare(tokenizer)
    text, total_images = content_to_text(parts, IMAGE_TOKEN, "document")
    if num_images is not None and num_images != total_images:
        raise ValueError(
            f"document has {total_images} image part(s) but {num_images} image(s) were given"
        )
    if not text.replace(IMAGE_TOKEN, "").strip():
        raise DroppedSample("empty_response", "the document has no text")
    enc = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids, added = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    # tokens the tokenizer itself put in front (BOS) are context, not targets
    lead = next((i for i, flag in enumerate(added) if not flag), len(ids))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    _check_images(ids, total_images, tokenizer, "document")
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        while ids and ids[-1] == image_id:
            ids.pop()  # an image with no text after it teaches nothing
    labels = [IGNORE_INDEX if i < lead or t == image_id else t for i, t in enumerate(ids)]
    if labels:
        labels[0] = IGNORE_INDEX
    result = _pack(ids, labels, ids.count(image_id))
    if result["num_supervised"] == 0:
        raise DroppedSample("truncated_no_response", f"no text fits in max_length={max_length}")
    return result
