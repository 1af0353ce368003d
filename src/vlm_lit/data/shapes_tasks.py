"""Shapes-world tasks: captions, VQA, POPE-style existence, multiple choice, multi-turn, ..."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

from vlm_lit.data.prompts import LETTER_ANSWER, SHORT_ANSWER, pick_caption_prompt
from vlm_lit.data.shapes_scene import (
    COLORS,
    PLURALS,
    SHAPES,
    Scene,
    object_prior,
    render_scene,
    sample_scene,
)

PopeType = Literal["random", "popular", "adversarial"]
POPE_TYPES: tuple[PopeType, ...] = ("random", "popular", "adversarial")
SIDES = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4, "cross": 12}
# (question, answer, extra meta) for one image; None when the scene cannot pose it.
QA = tuple[str, str, dict[str, Any]]
Builder = Callable[[random.Random, int, int], dict[str, Any]]
IMAGE = {"type": "image"}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _chat(user: list[dict[str, str]], answer: str, images: list, meta: dict) -> dict[str, Any]:
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [_text(answer)]},
    ]
    return {"messages": messages, "images": images, "meta": meta}


def q_color(rng: random.Random, scene: Scene, ordinal: int) -> QA | None:
    obj = rng.choice(scene.objects)
    if scene.count(shape=obj.shape) == 1 and rng.random() < 0.5:
        return f"What color is the {obj.shape}?", obj.color, {}
    return f"What color is the object at the {obj.position}?", obj.color, {}


def q_count(rng: random.Random, scene: Scene, ordinal: int) -> QA | None:
    kind = rng.randrange(3)
    if kind == 0:
        shape = rng.choice(SHAPES)  # may be absent: "0" is a valid, useful answer
        return f"How many {PLURALS[shape]} are there?", str(scene.count(shape=shape)), {}
    if kind == 1:
        color = rng.choice([o.color for o in scene.objects])
        return f"How many {color} objects are there?", str(scene.count(color=color)), {}
    return "How many objects are there?", str(len(scene.objects)), {}


def q_position(rng: random.Random, scene: Scene, ordinal: int) -> QA | None:
    unique = [o for o in scene.objects if scene.count(o.shape, o.color) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return f"Where is the {obj.name}?", obj.position, {}


def _negative(rng: random.Random, scene: Scene, pope_type: PopeType) -> str:
    """An absent "colour shape" name, sampled as POPE does for its three splits."""
    present = scene.names()
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    if pope_type == "popular":  # the absent objects most frequent under the world's prior
        prior = object_prior()
        return rng.choice(sorted(absent, key=lambda n: (-prior[n], n))[:3])
    if pope_type == "adversarial":  # shares a colour or a shape with something present
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        near = [n for n in absent if n.split()[0] in colors or n.split()[1] in shapes]
        return rng.choice(near or absent)
    return rng.choice(absent)


def q_exist(rng: random.Random, scene: Scene, ordinal: int) -> QA | None:
    # The ordinal alternates yes/no and cycles the POPE split, so any run of existence
    # questions is balanced 50/50 and every split has as many yes as no.
    pope_type = POPE_TYPES[(ordinal // 2) % len(POPE_TYPES)]
    if ordinal % 2 == 0:
        name, answer = rng.choice(scene.objects).name, "yes"
    else:
        name, answer = _negative(rng, scene, pope_type), "no"
    return f"Is there a {name} in the image?", answer, {"pope_type": pope_type}


def _image_qa(question_fn: Callable[[random.Random, Scene, int], QA | None]) -> Builder:
    def build(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
        qa: QA | None = None
        while qa is None:  # redraw scenes that cannot pose the question (rare)
            scene = sample_scene(rng)
            qa = question_fn(rng, scene, ordinal)
        question, answer, extra = qa
        user = [IMAGE, _text(f"{question}\n{SHORT_ANSWER}")]
        meta = {"answers": [answer], **extra}
        return _chat(user, answer, [render_scene(scene, image_size)], meta)

    return build


def build_caption(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    scene = sample_scene(rng)
    caption = scene.caption()
    user = [IMAGE, _text(pick_caption_prompt(rng))]
    return _chat(user, caption, [render_scene(scene, image_size)], {"answers": [caption]})


def build_mc(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    scene = sample_scene(rng)
    obj = rng.choice(scene.objects)
    attribute, vocab = rng.choice([("color", COLORS), ("shape", SHAPES)])
    correct = getattr(obj, attribute)
    options = [correct, *rng.sample([v for v in vocab if v != correct], 3)]
    rng.shuffle(options)
    letters = "ABCD"
    letter = letters[options.index(correct)]
    listing = "\n".join(f"{ltr}. {opt}" for ltr, opt in zip(letters, options, strict=True))
    prompt = f"What {attribute} is the object at the {obj.position}?\n{listing}\n{LETTER_ANSWER}"
    meta = {"answers": [letter], "options": options, "answer_text": correct}
    return _chat([IMAGE, _text(prompt)], letter, [render_scene(scene, image_size)], meta)


def build_multiturn(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    scene = sample_scene(rng)
    messages: list[dict[str, Any]] = []
    answers: list[str] = []
    for turn in range(rng.randint(2, 3)):
        fn = rng.choice([q_color, q_count, q_position, q_exist])
        while (qa := fn(rng, scene, rng.randrange(6))) is None:
            fn = q_color  # q_position needs a unique object; colour always works
        question, answer, _ = qa
        user = [_text(f"{question}\n{SHORT_ANSWER}")]
        messages.append({"role": "user", "content": [IMAGE, *user] if turn == 0 else user})
        messages.append({"role": "assistant", "content": [_text(answer)]})
        answers.append(answer)
    meta = {"answers": answers[-1:], "turn_answers": answers}
    return {"messages": messages, "images": [render_scene(scene, image_size)], "meta": meta}


def build_compare(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    first = sample_scene(rng)
    n = len(first.objects)
    if ordinal % 2 == 0:  # balanced yes/no via the ordinal, like existence questions
        same = (ordinal // 2) % 2 == 0
        other = n if same else rng.choice([k for k in range(1, 6) if k != n])
        question = "Do the two images have the same number of objects?"
        answer = "yes" if same else "no"
    else:
        other = rng.choice([k for k in range(1, 6) if k != n])
        question = "Which image has more objects? Answer first or second."
        answer = "first" if n > other else "second"
    second = sample_scene(rng, num_objects=other)
    images = [render_scene(first, image_size), render_scene(second, image_size)]
    user = [IMAGE, IMAGE, _text(f"{question}\n{SHORT_ANSWER}")]
    return _chat(user, answer, images, {"answers": [answer]})


def build_document(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    scenes = [sample_scene(rng) for _ in range(rng.randint(2, 3))]
    parts: list[dict[str, str]] = [_text("A few pictures of shapes.")]
    for i, scene in enumerate(scenes):
        parts += [IMAGE, _text(f"Picture {i + 1} shows {scene.caption()} .")]
    total = sum(len(s.objects) for s in scenes)
    parts.append(_text(f"Together the pictures show {total} objects."))
    images = [render_scene(s, image_size) for s in scenes]
    return {"document": parts, "images": images, "meta": {}}


def text_qa(rng: random.Random) -> tuple[str, str]:
    """A question that needs no image: arithmetic, comparison or a shape fact."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    kind = rng.randrange(4)
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        return f"What is {max(a, b)} minus {min(a, b)}?", str(abs(a - b))
    if kind == 2:
        return f"Which number is larger, {a} or {b}?", str(max(a, b))
    shape = rng.choice(SHAPES)
    return f"How many sides does a {shape} have?", str(SIDES[shape])


def build_text(rng: random.Random, ordinal: int, image_size: int) -> dict[str, Any]:
    question, answer = text_qa(rng)
    messages = [
        {"role": "user", "content": f"{question}\n{SHORT_ANSWER}"},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "images": [], "meta": {"answers": [answer]}}


TASK_BUILDERS: dict[str, Builder] = {
    "caption": build_caption,
    "vqa_color": _image_qa(q_color),
    "vqa_count": _image_qa(q_count),
    "vqa_position": _image_qa(q_position),
    "vqa_exist": _image_qa(q_exist),
    "mc": build_mc,
    "multiturn": build_multiturn,
    "compare": build_compare,
    "document": build_document,
    "text": build_text,
}
