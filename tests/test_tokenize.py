"""Tests for response-only tokenization of chats and interleaved documents."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tokenizers_fixtures import (
    ALPHABET,
    CHATML,
    FAMILIES,
    make_slow_tokenizer,
    make_tokenizer,
)
from vlm_lit.data.templates import DEFAULT_CHAT_TEMPLATE, resolve_chat_template
from vlm_lit.data.tokenize import (
    DROP_REASONS,
    IMAGE_TOKEN,
    DroppedSample,
    ensure_image_token,
    tokenize_conversation,
    tokenize_document,
)

# what each template writes right after an answer (the end-of-turn marker that must be learned)
EOT = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
    "vicuna": "</s>",
    "zephyr": "</s>",
    "chatml_plain": "<|im_end|>",
    "none": "<|endoftext|>",
}
NAMES = sorted(FAMILIES)
_CACHE: dict[str, Any] = {}


def tok_for(name: str) -> Any:
    """One tokenizer per family for the whole module (ensure_image_token is idempotent)."""
    if name not in _CACHE:
        _CACHE[name] = make_tokenizer(name)  # type: ignore[arg-type]
        ensure_image_token(_CACHE[name])
    return _CACHE[name]


def as_template_input(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as apply_chat_template sees it: string content, one placeholder per image."""
    out = []
    for m in messages:
        c = m["content"]
        if not isinstance(c, str):
            c = "\n".join(IMAGE_TOKEN if p["type"] == "image" else p["text"] for p in c)
        out.append({"role": m["role"], "content": c})
    return out


def reference_ids(messages: list[dict[str, Any]], tok: Any, gen: bool = False) -> list[int]:
    enc = tok.apply_chat_template(
        as_template_input(messages),
        chat_template=resolve_chat_template(tok),
        add_generation_prompt=gen,
        tokenize=True,
    )
    return list(enc["input_ids"])


def supervised_runs(out: dict[str, Any]) -> list[list[int]]:
    """Maximal runs of consecutive supervised positions, as token id lists."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(out["input_ids"].tolist(), out["labels"].tolist(), strict=True):
        on = lab != -100
        if on:
            assert lab == t, "a supervised label must equal its input id"
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = on
    return runs


def assert_answers(out: dict[str, Any], tok: Any, name: str, answers: list[str]) -> None:
    """Supervised tokens decode to exactly each answer + the end-of-turn marker, in order.

    A leading whitespace is allowed: a SentencePiece/BPE token such as " Three" carries the
    header's trailing space and is still the answer's first token.
    """
    runs = [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(out)]
    expected = [a + EOT[name] for a in answers]
    assert len(runs) == len(expected), (runs, expected)
    for got, want in zip(runs, expected, strict=True):
        assert got.endswith(want) and not got[: len(got) - len(want)].strip(), (got, want)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Three circles."}]},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And now?"}, {"type": "image"}, {"type": "image"}],
    },
    {"role": "assistant", "content": "The square is red."},
]


@pytest.mark.parametrize("name", NAMES)
def test_matches_apply_chat_template_and_supervises_only_answers(name: str) -> None:
    tok = tok_for(name)
    out = tokenize_conversation(CHAT, tok, num_images=3)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert ids.tolist() == reference_ids(CHAT, tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (ids == image_id).sum().item() == out["num_images"] == 3
    assert (labels[ids == image_id] == -100).all()
    assert out["num_supervised"] == int((labels != -100).sum())
    assert_answers(out, tok, name, ["Three circles.", "The square is red."])
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert labels[ids == tok.bos_token_id].eq(-100).all()


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral", "vicuna"])
def test_single_bos_when_template_writes_it(name: str) -> None:
    tok = tok_for(name)
    out = tokenize_conversation(CHAT, tok)
    bos = tok.bos_token_id
    assert out["input_ids"][0].item() == bos and (out["input_ids"] == bos).sum().item() == 1
    # the bug this guards against: letting the tokenizer add its own BOS on top
    rendered = tok.apply_chat_template(as_template_input(CHAT), tokenize=False)
    assert tok(rendered)["input_ids"][:2] == [bos, bos]


def test_content_as_string_or_parts_is_identical() -> None:
    tok = tok_for("chatml")
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}],
        },
    ]
    plain = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello\nagain"},
    ]
    a, b = tokenize_conversation(parts, tok), tokenize_conversation(plain, tok)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert_answers(a, tok, "chatml", ["Hello\nagain"])


def test_text_only_and_default_system_prompt_not_supervised() -> None:
    tok = tok_for("chatml")
    out = tokenize_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tok
    )
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert out["num_images"] == 0
    assert_answers(out, tok, "chatml", ["a"])


def test_end_of_turn_found_without_stable_prefixes() -> None:
    tok = make_tokenizer("chatml")
    # like templates that treat the last turn specially (e.g. reasoning models)
    tok.chat_template = CHATML.replace(
        "{%- endfor %}", "{%- if loop.last %}{{- '<|endoftext|>' }}{%- endif %}{%- endfor %}"
    )
    out = tokenize_conversation(CHAT, tok)
    runs = [tok.decode(r) for r in supervised_runs(out)]
    # <|endoftext|> is this family's padding token: never a target, nor the "\n" before it
    assert runs == ["Three circles.<|im_end|>", "The square is red.<|im_end|>"]


def test_straddling_token_is_supervised() -> None:
    tok = tok_for("vicuna")  # "ASSISTANT: " + answer: SentencePiece glues the space to the answer
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the square"}]
    out = tokenize_conversation(msgs, tok)
    pieces = tok.convert_ids_to_tokens(out["input_ids"].tolist())
    first = len(pieces) - 1 - pieces[::-1].index("\u2581the")  # " the": starts on the space
    assert out["labels"][first].item() == out["input_ids"][first].item()
    assert out["labels"][first - 1].item() == -100


def test_empty_answers() -> None:
    tok = tok_for("chatml")
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": [{"type": "text", "text": "real"}]},
    ]
    out = tokenize_conversation(msgs, tok)
    assert_answers(out, tok, "chatml", ["real"])  # no stray <|im_end|> after the empty turn
    for empty in ("", "  \n", [{"type": "text", "text": ""}]):
        with pytest.raises(DroppedSample) as info:
            tokenize_conversation([msgs[0], {"role": "assistant", "content": empty}], tok)
        assert info.value.reason == "empty_response"


def test_no_assistant_turn_is_an_unsupervised_prompt() -> None:
    tok = tok_for("llama3")
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]
    out = tokenize_conversation(msgs, tok, add_generation_prompt=True)
    assert out["num_supervised"] == 0 and (out["labels"] == -100).all()
    assert out["input_ids"].tolist() == reference_ids(msgs, tok, gen=True)
    assert tok.decode(out["input_ids"]).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([{"role": "tool", "content": "x"}], {}, r"unknown role 'tool'"),
        ([{"role": "user", "content": [{"type": "text", "text": 1.5}]}], {}, "must be a string"),
        ([], {}, "non-empty"),
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            {"num_images": 2},
            r"1 image part\(s\) but 2",
        ),
        ([{"role": "user", "content": "look: <image>"}], {}, "literal '<image>'"),
    ],
)
def test_bad_input_raises_clear_errors(messages: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        tokenize_conversation(messages, tok_for("chatml"), **kwargs)
    assert not isinstance(info.value, DroppedSample)


def test_image_token_is_added_once_and_never_split() -> None:
    tok = make_tokenizer("chatml")
    size = len(tok)
    assert IMAGE_TOKEN not in tok.get_vocab()
    assert ensure_image_token(tok) is True and len(tok) == size + 1
    assert ensure_image_token(tok) is False and len(tok) == size + 1
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (
        tok("a<image>b<image><image>", add_special_tokens=False)["input_ids"].count(image_id) == 3
    )
    fresh = make_tokenizer("gemma")
    out = tokenize_conversation(CHAT, fresh)  # tokenize adds it when missing
    assert out["input_ids"].tolist().count(fresh.convert_tokens_to_ids(IMAGE_TOKEN)) == 3


def test_truncation_drops_whole_trailing_exchanges() -> None:
    tok = tok_for("chatml")
    full = tokenize_conversation(CHAT, tok)
    first = tokenize_conversation(CHAT[:3], tok)
    n1, n2 = len(first["input_ids"]), len(full["input_ids"])
    for max_length in (n1, n2 - 1):
        out = tokenize_conversation(CHAT, tok, max_length=max_length)
        assert out["input_ids"].tolist() == reference_ids(CHAT[:3], tok)
        assert out["num_images"] == 1  # the second turn's two images went with it
        assert_answers(out, tok, "chatml", ["Three circles."])
    assert torch.equal(
        tokenize_conversation(CHAT, tok, max_length=n2)["input_ids"], full["input_ids"]
    )
    with pytest.raises(DroppedSample) as info:
        tokenize_conversation(CHAT, tok, max_length=n1 - 1)
    assert info.value.reason == "too_long"


def test_truncation_that_keeps_only_an_empty_answer_is_dropped() -> None:
    tok = tok_for("chatml")
    msgs = [dict(m) for m in CHAT]
    msgs[2] = {"role": "assistant", "content": ""}
    n1 = len(
        tokenize_conversation(msgs[:2] + [{"role": "assistant", "content": "x"}], tok)["input_ids"]
    )
    with pytest.raises(DroppedSample) as info:
        tokenize_conversation(msgs, tok, max_length=n1)
    assert info.value.reason == "truncated_no_response"


def test_generation_prompt_is_never_shortened() -> None:
    tok = tok_for("chatml")
    prompt = CHAT[:4]
    n = len(tokenize_conversation(prompt, tok, add_generation_prompt=True)["input_ids"])
    with pytest.raises(DroppedSample) as info:
        tokenize_conversation(prompt, tok, add_generation_prompt=True, max_length=n - 1)
    assert info.value.reason == "too_long"


def test_rewriting_template_is_dropped_as_mismatch() -> None:
    tok = make_tokenizer("chatml")
    tok.chat_template = CHATML.replace("message['content']", "message['content'] | upper")
    with pytest.raises(DroppedSample) as info:
        tokenize_conversation(CHAT, tok)
    assert info.value.reason == "tokenization_mismatch" and info.value.reason in DROP_REASONS


@pytest.mark.parametrize("name", ["chatml", "vicuna", "none"])
def test_slow_tokenizer_gives_the_same_labels(name: str) -> None:
    tok = make_slow_tokenizer(name)  # type: ignore[arg-type]
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}],
        },
        {"role": "assistant", "content": "three circles."},
        {"role": "user", "content": "the colour?"},
        {"role": "assistant", "content": "red"},
    ]
    out = tokenize_conversation(msgs, tok)
    assert not tok.is_fast
    assert out["input_ids"].tolist() == reference_ids(msgs, tok)
    assert_answers(out, tok, name, ["three circles.", "red"])


def test_slow_tokenizer_token_across_answer_boundary_is_dropped() -> None:
    tok = make_slow_tokenizer("chatml")
    # "(a)" is one vocabulary piece, so no token boundary exists around the answer "a"
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'user' %}{{- m['content'] + ' ' }}"
        "{%- else %}{{- '(' + m['content'] + ')' + eos_token }}{%- endif %}{%- endfor %}"
    )
    with pytest.raises(DroppedSample) as info:
        tokenize_conversation(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tok
        )
    assert info.value.reason == "tokenization_mismatch"


# ---- property-based: random conversations over every template ------------------------------

text_st = st.text(alphabet=ALPHABET, min_size=0, max_size=24)
NONSPACE = [c for c in ALPHABET if not c.isspace()]
# answers as the trimming templates (Llama-3, Gemma, Mistral) render them: no outer whitespace
answer_st = st.builds(lambda head, rest: (head + rest).rstrip(), st.sampled_from(NONSPACE), text_st)
user_part_st = st.one_of(
    st.just({"type": "image"}), text_st.map(lambda t: {"type": "text", "text": t})
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(answer_st)})
    for _ in range(draw(st.integers(1, 3))):
        parts = draw(st.lists(user_part_st, min_size=1, max_size=4))
        msgs.append({"role": "user", "content": parts})
        answer = draw(answer_st)
        content = answer if draw(st.booleans()) else [{"type": "text", "text": answer}]
        msgs.append({"role": "assistant", "content": content})
    return msgs


def _answers(msgs: list[dict[str, Any]]) -> list[str]:
    return [
        m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
        for m in msgs
        if m["role"] == "assistant"
    ]


def _clean(msgs: list[dict[str, Any]], tok: Any) -> bool:
    """Random text must not spell a control token (it would be one, as in any chat pipeline)."""
    texts = [m["content"] for m in msgs if isinstance(m["content"], str)]
    texts += [
        p["text"]
        for m in msgs
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "text"
    ]
    text = "\x00".join(texts)
    return not any(
        s in text for s in [*tok.all_special_tokens, IMAGE_TOKEN, "<|im_end|>", "<|im_start|>"]
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), msgs=conversations())
def test_property_supervised_tokens_are_exactly_answers_plus_end_of_turn(
    name: str, msgs: list
) -> None:
    tok = tok_for(name)
    assume(_clean(msgs, tok))
    n_images = sum(p["type"] == "image" for m in msgs if m["role"] == "user" for p in m["content"])
    out = tokenize_conversation(msgs, tok, num_images=n_images)
    assert out["input_ids"].tolist() == reference_ids(msgs, tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out["num_images"] == n_images == (out["input_ids"] == image_id).sum().item()
    assert (out["labels"][out["input_ids"] == image_id] == -100).all()
    assert_answers(out, tok, name, _answers(msgs))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["chatml", "llama3", "vicuna", "none"]),
    msgs=conversations(),
    frac=st.floats(0.2, 1.1),
)
def test_property_truncation_keeps_a_fitting_prefix_of_whole_exchanges(
    name: str, msgs: list, frac: float
) -> None:
    tok = tok_for(name)
    assume(_clean(msgs, tok))
    max_length = max(1, int(frac * len(reference_ids(msgs, tok))))
    cuts = [i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant"]
    fitting = [c for c in cuts if len(reference_ids(msgs[:c], tok)) <= max_length]
    try:
        out = tokenize_conversation(msgs, tok, max_length=max_length)
    except DroppedSample as err:
        assert err.reason == "too_long" and not fitting
        return
    kept = msgs[: max(fitting)]
    assert out["input_ids"].tolist() == reference_ids(kept, tok)
    assert out["num_images"] == sum(
        p["type"] == "image" for m in kept if m["role"] == "user" for p in m["content"]
    )
    assert_answers(out, tok, name, _answers(kept))


# ---- interleaved documents ------------------------------------------------------------------

DOC = [
    {"type": "text", "text": "A red square."},
    {"type": "image"},
    {"type": "text", "text": "Three circles."},
    {"type": "image"},
    {"type": "text", "text": "The end"},
]


@pytest.mark.parametrize("name", ["llama3", "chatml", "mistral"])
def test_document_supervises_all_text_and_no_placeholder(name: str) -> None:
    tok = tok_for(name)
    out = tokenize_document(DOC, tok, num_images=2)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    body = tok("A red square.\n<image>\nThree circles.\n<image>\nThe end")["input_ids"]
    assert ids == body + [tok.eos_token_id]  # BOS exactly as the tokenizer adds it, then EOS
    assert out["num_images"] == 2
    # BOS (when the tokenizer adds one) or the first text token: nothing predicts position 0
    for i, (t, lab) in enumerate(zip(ids, labels, strict=True)):
        assert lab == (-100 if t == image_id or i == 0 else t)
    assert labels[-1] == tok.eos_token_id


def test_document_truncation_cuts_text_never_leaves_a_trailing_image() -> None:
    tok = tok_for("llama3")
    full = tokenize_document(DOC, tok)["input_ids"].tolist()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    second = [i for i, t in enumerate(full) if t == image_id][1]
    out = tokenize_document(DOC, tok, max_length=second + 1)  # would end on the 2nd image
    assert out["input_ids"].tolist() == full[:second] and out["num_images"] == 1
    out = tokenize_document(DOC, tok, max_length=second + 3)  # cut inside the last text
    assert out["input_ids"].tolist() == full[: second + 3] and out["num_images"] == 2
    assert out["input_ids"][-1].item() != tok.eos_token_id  # a cut document does not "end"


def test_document_drops() -> None:
    tok = tok_for("llama3")
    with pytest.raises(DroppedSample) as info:
        tokenize_document([{"type": "image"}, {"type": "text", "text": " "}], tok)
    assert info.value.reason == "empty_response"
    with pytest.raises(DroppedSample) as info:
        tokenize_document([{"type": "image"}, {"type": "text", "text": "words"}], tok, max_length=2)
    assert info.value.reason == "truncated_no_response"
    with pytest.raises(ValueError, match="must be a string"):
        tokenize_document([{"type": "text", "text": b"bytes"}], tok)
    with pytest.raises(ValueError, match=r"2 image part\(s\) but 1"):
        tokenize_document(DOC, tok, num_images=1)


def test_default_template_is_documented_constant() -> None:
    tok = tok_for("none")
    assert tok.chat_template is None and resolve_chat_template(tok) == DEFAULT_CHAT_TEMPLATE
